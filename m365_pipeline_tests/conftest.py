"""Shared fixtures: a real simulator on 127.0.0.1, temp DuckDB files, published data and m365-serve.

Plain helpers (resources, whole-graph runs, queries, certificates) live in ``helpers.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from m365_pipeline import scrub
from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.settings import DUCKDB_FILE
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig

from .helpers import SOURCE_VARIABLES, Published, Served, run_pipeline, spawn_serve


@pytest.fixture(autouse=True)
def no_source_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sources are configured by each test, never by the developer's shell or a ``.env`` another test loaded."""
    for name in SOURCE_VARIABLES:
        monkeypatch.setenv(name, "")  # blank reads as unset; recorded, so whatever a test sets is undone


@pytest.fixture(autouse=True)
def no_remembered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scrubber's process-wide secrets start empty in each test: another test's one-letter token would
    scrub ordinary letters from this test's texts."""
    monkeypatch.setattr(scrub, "_remembered", {})


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
    return tmp_path / "data" / DUCKDB_FILE


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_port()


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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start real ``m365-serve`` processes on free ports; each is stopped (SIGTERM) afterwards."""
    started: list[Served] = []

    def start(data_dir: Path, *extra: str, scheme: str = "http") -> Served:
        port = free_port()
        log_path = tmp_path / f"serve-{port}.log"
        with log_path.open("w") as log:
            proc = spawn_serve(data_dir, port, log, *extra)
        served = Served(f"{scheme}://127.0.0.1:{port}", port, proc, log_path)
        started.append(served)  # stopped afterwards even if it never starts listening
        wait_for_port(port, proc)
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
        proc = spawn_serve(published.data_dir, port, log)
    try:
        wait_for_port(port, proc)
        yield Served(f"http://127.0.0.1:{port}", port, proc, log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
