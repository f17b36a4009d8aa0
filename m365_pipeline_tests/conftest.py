"""Shared fixtures: a real simulator on 127.0.0.1, temp DuckDB files, and resources wired to them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig

# Small, fast retry settings so fault tests finish in seconds.
FAST_HTTP = {"timeout_s": 5.0, "max_retries": 4, "backoff_factor": 0.01, "retry_after_max_s": 1}


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., Simulator]]:
    """Start simulators on free loopback ports; all are stopped when the test ends."""
    with ExitStack() as stack:
        def start(orgs: int = 6, users_per_org: int = 12, seed: int = 7, **faults: Any) -> Simulator:
            config = SimulatorConfig(orgs=orgs, users_per_org=users_per_org, seed=seed,
                                     faults=FaultConfig(**faults))
            return stack.enter_context(Simulator(config, host="127.0.0.1", port=0))
        yield start


@pytest.fixture
def simulator(start_simulator: Callable[..., Simulator]) -> Simulator:
    return start_simulator()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "m365.duckdb"


def make_resources(sim: Simulator | None, db_path: Path, *, saas: dict[str, Any] | None = None,
                   backup: dict[str, Any] | None = None, sources: tuple[str, ...] = ("saas", "backup")
                   ) -> dict[str, Any]:
    """Resources pointing at ``sim``; ``sources`` chooses which vendors are configured."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    env = sim.env if sim else {}
    saas_cfg: dict[str, Any] = {**FAST_HTTP, **(saas or {})}
    backup_cfg: dict[str, Any] = {**FAST_HTTP, **(backup or {})}
    if "saas" in sources:
        saas_cfg = {"base_url": env["SAAS_API_BASE_URL"], "token": env["SAAS_API_TOKEN"], **saas_cfg}
    if "backup" in sources:
        backup_cfg = {"base_url": env["BACKUP_API_BASE_URL"], "reseller_token": env["BACKUP_RESELLER_TOKEN"],
                      "admin_token": env["BACKUP_ADMIN_TOKEN"], **backup_cfg}
    return {
        "saas": SaasApiResource(**saas_cfg),
        "backup": BackupApiResource(**backup_cfg),
        "duckdb": DuckDBResource(database=str(db_path)),
    }


def query(db_path: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db_path), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_port()


# -- the whole graph, published data and a running m365-serve ---------------------------------

def all_definitions() -> list[Any]:
    from m365_pipeline.assets.core import core_assets, core_checks
    from m365_pipeline.assets.export import export_assets
    from m365_pipeline.assets.marts import marts_assets, marts_checks
    from m365_pipeline.assets.raw import raw_assets

    return [*raw_assets, *core_assets, *marts_assets, *export_assets, *core_checks, *marts_checks]


def run_pipeline(sim: Simulator | None, data_dir: Path, *, raise_on_error: bool = True, **kwargs: Any):
    """Materialize every asset and check into ``data_dir`` (as the nightly job does)."""
    from dagster import materialize

    from m365_pipeline.resources import PublishPolicy

    policy = kwargs.pop("policy", PublishPolicy())
    resources = {**make_resources(sim, data_dir / "m365.duckdb", **kwargs), "publish_policy": policy}
    return materialize(all_definitions(), resources=resources, raise_on_error=raise_on_error)


@dataclass
class Published:
    data_dir: Path
    truth: dict[str, Any]


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One published version of simulator data (12 orgs), shared read-only by server tests."""
    from m365_pipeline.simulator import ground_truth

    data_dir = tmp_path_factory.mktemp("published") / "data"
    config = SimulatorConfig(orgs=12, users_per_org=10, seed=42, faults=FaultConfig())
    with Simulator(config, host="127.0.0.1", port=0) as sim:
        run_pipeline(sim, data_dir)
        truth = ground_truth(sim.dataset)
    return Published(data_dir, truth)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


@dataclass
class Served:
    base_url: str
    port: int
    process: subprocess.Popen
    log_path: Path


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start real ``m365-serve`` processes on free ports; each is stopped (SIGTERM) afterwards."""
    started: list[Served] = []

    def start(data_dir: Path, *extra: str, scheme: str = "http") -> Served:
        port = free_port()
        log_path = tmp_path / f"serve-{port}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "m365-serve"), "--port", str(port), "--data-dir", str(data_dir),
             *extra],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        wait_for_port(port, proc)
        served = Served(f"{scheme}://127.0.0.1:{port}", port, proc, log_path)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.terminate()
            try:
                served.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                served.process.kill()


@pytest.fixture(scope="session")
def session_server(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One m365-serve over the shared published data, for read-only API tests."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "m365-serve"), "--port", str(port), "--data-dir",
             str(published.data_dir)], stdout=log, stderr=subprocess.STDOUT, text=True)
        wait_for_port(port, proc)
        yield Served(f"http://127.0.0.1:{port}", port, proc, log_path)
        proc.terminate()
        proc.wait(timeout=10)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made by the test, valid one day."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key
