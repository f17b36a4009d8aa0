"""Shared fixtures: a real simulator on 127.0.0.1, temp DuckDB files, and resources wired to them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
