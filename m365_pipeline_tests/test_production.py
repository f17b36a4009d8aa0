"""The README's production services start against workspace.yaml: webserver and daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from m365_pipeline.processes import free_port, wait_for_port

from .helpers import BIN

pytestmark = pytest.mark.slow  # each starts a Dagster service and waits for it to load the workspace

ROOT = Path(__file__).resolve().parents[1]
DAGSTER_YAML = "telemetry:\n  enabled: false\nrun_retries:\n  enabled: true\n"


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    return {**os.environ, "DAGSTER_HOME": str(home), "M365_DATA_DIR": str(tmp_path / "data")}


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_webserver_loads_the_workspace_with_job_schedule_and_assets(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                             "-p", str(port)], cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=90)
        query = """{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
            ... on RepositoryLocation { repositories { jobs { name } schedules { name cronSchedule }
            assetNodes { assetKey { path } } } } ... on PythonError { message } } } } } }"""
        deadline = time.monotonic() + 60
        while True:
            body = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30).json()
            location = body["data"]["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]
            if location is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "message" not in location, location
        repository = location["repositories"][0]
        assert "nightly_refresh" in {job["name"] for job in repository["jobs"]}
        assert {"name": "nightly_refresh_at_2300", "cronSchedule": "0 23 * * *"} in repository["schedules"]
        assert ["marts", "org_summary"] in [node["assetKey"]["path"] for node in repository["assetNodes"]]
    finally:
        _stop(proc)


def test_daemon_starts_the_scheduler_for_the_workspace(tmp_path):
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT,
                                env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "SchedulerDaemon" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
        finally:
            _stop(proc)
    text = log.read_text()
    assert "SchedulerDaemon" in text, text[-2000:]
