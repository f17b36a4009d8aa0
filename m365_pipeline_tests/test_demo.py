"""`make demo` and `make dev` as a new user meets them, through the real Makefile: correct data on
the API (nights and coverage too); Ctrl-C, SIGINT and SIGTERM (from a terminal, a script or a
service manager) leave nothing behind; busy ports and unusable data directories are refused at
once with one line."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from m365_pipeline.processes import free_port, port_is_free
from m365_pipeline.settings import ANALYTICS_FILE
from m365_pipeline.simulator import SimulatorConfig, ground_truth

from .helpers import BIN

REPO = Path(__file__).resolve().parents[1]
READY = {"demo": "Ctrl-C stops everything", "dev": "Dagster UI on"}
PAST = 2  # past nights in the summary test: every night is a real run, so not the default two weeks


def make(target: str) -> list[str]:
    """The README's `make <target>`, run from the test's directory, with the venv the suite runs in
    (STAMP= skips building a second one; the recipe itself is the Makefile's)."""
    return ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), target, "STAMP=", f"BIN={BIN}"]


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "M365_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({"M365_DEMO_PORT": str(free_port()), "M365_DEMO_SIMULATOR_PORT": str(free_port()),
                "M365_DAGSTER_PORT": str(free_port()), "M365_DEMO_PAST_NIGHTS": "0", **extra})
    return env


def processes_started_from(directory: Path) -> list[str]:
    """Every process (any depth, any session) whose working directory or environment is ``directory``'s."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(directory)) or str(directory).encode() in environ:
            found.append(f"{entry.name}: {cmdline}")
    return found


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    # Generous: the demo runs its past nights one process each, and CI may share the cores with other work.
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(output)
        output.append(line)
        if marker in line:
            return "".join(output)
    raise AssertionError(f"no {marker!r} within {timeout} s:\n{''.join(output)}")


def assert_all_stopped(proc: subprocess.Popen, directory: Path, env: dict[str, str], timeout: float = 40) -> None:
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + 5
    while processes_started_from(directory) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_started_from(directory) == []
    for variable in ("M365_DEMO_PORT", "M365_DEMO_SIMULATOR_PORT", "M365_DAGSTER_PORT"):
        assert port_is_free(int(env[variable])), variable


def kill_leftovers(directory: Path) -> None:
    """After a failed assertion only: leave none of this test's processes running."""
    for line in processes_started_from(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_make_demo_serves_the_correct_summary_and_nights_and_ctrl_c_in_a_terminal_stops_everything(tmp_path):
    env = demo_env(M365_DEMO_PAST_NIGHTS=str(PAST))
    (tmp_path / "workspace.yaml").write_text("load_from:\n  - python_module: m365_pipeline.definitions\n")
    # A terminal's Ctrl-C is SIGINT to the foreground process group: make and the demo both get it.
    demo = subprocess.Popen(make("demo"), cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = read_until(demo, READY["demo"])
        api_port = env["M365_DEMO_PORT"]
        assert f"http://127.0.0.1:{api_port}/" in text and "analytics.duckdb" in text and "make dev" in text
        # A first run into an empty data directory says so in the run log.
        assert f"first run into {tmp_path / 'data'}" in text

        summary = requests.get(f"http://127.0.0.1:{api_port}/api/m365/summary", timeout=5).json()
        # Tonight is the simulator's night PAST; the PAST nights before ran at their own dates.
        truth = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42, night=PAST))
        assert summary["organizations"] == truth["organizations"]
        assert summary["totals"] == truth["totals"]
        history = requests.get(f"http://127.0.0.1:{api_port}/api/m365/history", timeout=5).json()["history"]
        today = dt.datetime.now(dt.UTC).date()
        assert [row["date"] for row in history] == [str(today - dt.timedelta(days=d)) for d in range(PAST, -1, -1)]
        first = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42))["totals"]
        assert history[0]["m365_licensed_user_count"] == first["total_m365_licensed_users"]
        assert history[-1]["es_user_count"] == truth["totals"]["total_es_users"]
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
        os.killpg(demo.pid, signal.SIGINT)
        try:
            assert_all_stopped(demo, tmp_path, env)
        finally:
            kill_leftovers(tmp_path)
    assert demo.returncode in (0, -signal.SIGINT), demo.returncode  # make re-raises SIGINT on itself


def _backgrounded(target: str, directory: Path, env: dict[str, str], ready: str = ""
                  ) -> tuple[subprocess.Popen, int, int]:
    """`bash -c 'make <target> & wait'` as a script runs it: SIGINT is ignored in the background job.
    Returns the script, make's pid and the demo's (make's child) pid once it printed ``ready``."""
    script = subprocess.Popen(["bash", "-c", f"{' '.join(make(target))} & wait"], cwd=directory, env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    read_until(script, ready or READY[target])
    (make_pid,) = children_of(script.pid)
    (demo_pid,) = children_of(make_pid)
    return script, make_pid, demo_pid


@pytest.mark.slow
@pytest.mark.parametrize("target", ["demo", "dev"])
@pytest.mark.parametrize("signum, to", [(signal.SIGTERM, "make"), (signal.SIGINT, "demo")],
                         ids=["SIGTERM-to-make", "SIGINT-to-the-demo-process"])
def test_a_backgrounded_make_target_stops_everything_on_sigterm_and_sigint(tmp_path, target, signum, to):
    env = demo_env()
    (tmp_path / "workspace.yaml").write_text("load_from:\n  - python_module: m365_pipeline.definitions\n")
    script, make_pid, demo_pid = _backgrounded(target, tmp_path, env)
    try:
        if target == "dev":  # dagster dev is up once its UI answers
            deadline = time.monotonic() + 180
            while port_is_free(int(env["M365_DAGSTER_PORT"])) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not port_is_free(int(env["M365_DAGSTER_PORT"])), "dagster dev never listened"
        os.kill(make_pid if to == "make" else demo_pid, signum)
        assert_all_stopped(script, tmp_path, env)
    finally:
        kill_leftovers(tmp_path)


@pytest.mark.slow
def test_sigterm_to_a_backgrounded_make_demo_during_its_pipeline_run_stops_everything(tmp_path):
    """Dagster's in-process run notes the signal and finishes; the demo must still stop, not serve."""
    env = demo_env()
    script, make_pid, _ = _backgrounded("demo", tmp_path, env, ready="first run into")  # the run has begun
    try:
        os.kill(make_pid, signal.SIGTERM)
        assert_all_stopped(script, tmp_path, env, timeout=240)
        rest = script.stdout.read()
        assert "[demo] stopping" in rest and READY["demo"] not in rest, rest
    finally:
        kill_leftovers(tmp_path)


@contextmanager
def listening_on(port: int) -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


@pytest.mark.parametrize("target, variable", [
    ("demo", "M365_DEMO_PORT"), ("demo", "M365_DEMO_SIMULATOR_PORT"),
    ("dev", "M365_DAGSTER_PORT"), ("dev", "M365_DEMO_SIMULATOR_PORT"),
])
def test_a_busy_port_stops_make_at_once_naming_the_variable_that_moves_it(tmp_path, target, variable):
    env = demo_env()
    port = int(env[variable])
    with listening_on(port):
        started = time.monotonic()
        result = subprocess.run(make(target), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 5
    assert result.returncode != 0
    assert f"port {port} is in use" in result.stderr and f"set {variable}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and processes_started_from(tmp_path) == []


def test_a_port_variable_that_is_not_a_port_is_one_line(tmp_path):
    result = subprocess.run(make("dev"), cwd=tmp_path, env=demo_env(M365_DAGSTER_PORT="30OO"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "M365_DAGSTER_PORT='30OO' is not a port number" in result.stderr
    assert "Traceback" not in result.stderr
