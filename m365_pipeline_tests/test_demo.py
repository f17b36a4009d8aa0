"""`make demo` as a new user meets it: correct data on the API (coverage too), and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from m365_pipeline.processes import free_port
from m365_pipeline.settings import ANALYTICS_FILE
from m365_pipeline.simulator import SimulatorConfig, ground_truth

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def test_demo_serves_the_correct_summary_and_ctrl_c_stops_everything(tmp_path):
    api_port, sim_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "M365_DATA_DIR")}
    env.update(M365_DEMO_PORT=str(api_port), M365_DEMO_SIMULATOR_PORT=str(sim_port))
    (tmp_path / "workspace.yaml").write_text("load_from:\n  - python_module: m365_pipeline.definitions\n")
    demo = subprocess.Popen([sys.executable, "-m", "m365_pipeline.demo", "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "".join(output)
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(output)
        assert f"http://127.0.0.1:{api_port}/" in text and "analytics.duckdb" in text and "make dev" in text

        summary = requests.get(f"http://127.0.0.1:{api_port}/api/m365/summary", timeout=5).json()
        truth = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42))
        assert summary["organizations"] == truth["organizations"]
        assert summary["totals"] == truth["totals"]
        # Backup coverage (rule 13) with real gaps of both kinds, for the dashboard's column and drill-down.
        coverage = requests.get(f"http://127.0.0.1:{api_port}/api/m365/coverage", timeout=5).json()
        assert coverage["organizations"] == truth["coverage"]["organizations"]
        assert coverage["totals"] == truth["coverage"]["totals"]
        assert coverage["totals"]["total_es_users_not_backed_up"] > 0
        assert coverage["totals"]["total_backed_up_without_email_license"] > 0
        home = tmp_path / ".dagster_home"
        assert "enabled: false" in (home / "dagster.yaml").read_text()  # telemetry off, project-local
        assert (tmp_path / "data" / ANALYTICS_FILE).is_file()
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)
    time.sleep(0.5)
    assert _processes_mentioning(f"--port {api_port}") == []
    assert _processes_mentioning(f"--port {sim_port}") == []
    assert demo.returncode == 0
