"""`make demo` as a new user meets it: correct data and two weeks of nights on the API, and Ctrl-C leaves
nothing behind."""

from __future__ import annotations

import datetime as dt
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
PAST = 2


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
    # Two past nights rather than the default two weeks: every night is a real run (~10-60 s each).
    env.update(M365_DEMO_PORT=str(api_port), M365_DEMO_SIMULATOR_PORT=str(sim_port), M365_DEMO_PAST_NIGHTS=str(PAST))
    (tmp_path / "workspace.yaml").write_text("load_from:\n  - python_module: m365_pipeline.definitions\n")
    demo = subprocess.Popen([sys.executable, "-m", "m365_pipeline.demo", "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        deadline = time.monotonic() + 600  # three real pipeline runs, one per night
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "".join(output)
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(output)
        assert f"http://127.0.0.1:{api_port}/" in text and "analytics.duckdb" in text and "make dev" in text

        summary = requests.get(f"http://127.0.0.1:{api_port}/api/m365/summary", timeout=5).json()
        # Tonight is the simulator's night PAST; the PAST nights before ran at their own dates.
        truth = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42, night=PAST))
        assert summary["organizations"] == truth["organizations"]
        assert summary["totals"] == truth["totals"]
        history = requests.get(f"http://127.0.0.1:{api_port}/api/m365/history", timeout=5).json()["history"]
        today = dt.datetime.now(dt.UTC).date()
        assert [row["date"] for row in history] == [str(today - dt.timedelta(days=d))
                                                   for d in range(PAST, -1, -1)]
        first = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42))["totals"]
        assert history[0]["m365_licensed_user_count"] == first["total_m365_licensed_users"]
        assert history[-1]["es_user_count"] == truth["totals"]["total_es_users"]
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
