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

from m365_pipeline.demo import history_plan, past_night_dates
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
    # Generous: CI may share the cores with other work.
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


def expected_nights(today: dt.date) -> list[str]:
    """The PAST nights before tonight, then tonight: the days before today, the oldest moved to the
    previous month's last day when they would all be in today's month (issue 23: a closed month)."""
    previous_month_end = today.replace(day=1) - dt.timedelta(days=1)
    days = [today - dt.timedelta(days=back) for back in range(PAST, -1, -1)]
    return [str(previous_month_end if i == 0 and days[0].month == today.month else day) for i, day in enumerate(days)]


def assert_clean_output(text: str) -> None:
    """What a user reads: make's command, progress per night, the run's own warnings, the banner."""
    assert "Traceback" not in text and "Error" not in text and "[INFO]" not in text, text
    for line in text.splitlines():
        assert (not line.strip() or line.startswith(("[demo] ", "m365-serve: ", "  ")) or "m365_pipeline.demo" in line
                or line.startswith("make")), line


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
        assert [row["date"] for row in history] == expected_nights(dt.datetime.now(dt.UTC).date())
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
        assert_clean_output(text)
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
    script, make_pid, _ = _backgrounded("demo", tmp_path, env, ready="[demo] simulator:")  # tonight's run is next
    try:
        # The run has begun once its first step made the pipeline's DuckDB file.
        deadline = time.monotonic() + 120
        while not (tmp_path / "data" / "m365.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "data" / "m365.duckdb").exists(), "the run never began"
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


@pytest.mark.slow
def test_make_demo_twice_in_one_clone_keeps_its_history_and_every_way_of_stopping_leaves_nothing(tmp_path):
    """Issue 26: a second and a third `make demo` in the same clone serve again, keeping the nights the
    first made (a past night older than a kept one would be refused, rule 11), with no traceback;
    each is stopped another documented way, and each time no process of the clone is left."""
    env = demo_env(M365_DEMO_PAST_NIGHTS=str(PAST))
    api = f"http://127.0.0.1:{env['M365_DEMO_PORT']}/api/m365"
    today = dt.datetime.now(dt.UTC).date()
    # Tonight is the simulator's night PAST every time: the kept nights before today are PAST.
    truth = ground_truth(SimulatorConfig(orgs=40, users_per_org=17, seed=42, night=PAST))
    first = subprocess.Popen(make("demo"), cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert_clean_output(read_until(first, READY["demo"]))
        assert [row["date"] for row in requests.get(f"{api}/history", timeout=5).json()["history"]] == \
            expected_nights(today)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal
        assert_all_stopped(first, tmp_path, env)

        for signum, to in [(signal.SIGINT, "demo"), (signal.SIGTERM, "make")]:
            script = subprocess.Popen(["bash", "-c", f"{' '.join(make('demo'))} & wait"], cwd=tmp_path, env=env,
                                      start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            text = read_until(script, READY["demo"], timeout=300)
            assert_clean_output(text)
            assert f"keeping the {PAST + 1} nights in {tmp_path / 'data'}" in text and "night 1 of 1: tonight" in text
            assert [row["date"] for row in requests.get(f"{api}/history", timeout=5).json()["history"]] == \
                expected_nights(today)  # the same nights: tonight's run replaced tonight
            summary = requests.get(f"{api}/summary", timeout=5).json()
            assert summary["organizations"] == truth["organizations"] and summary["totals"] == truth["totals"]
            (make_pid,) = children_of(script.pid)
            (demo_pid,) = children_of(make_pid)
            os.kill(make_pid if to == "make" else demo_pid, signum)
            assert_all_stopped(script, tmp_path, env)
            assert_clean_output(script.stdout.read())
    finally:
        kill_leftovers(tmp_path)


# 1st, 14th, 15th, 31st of a month, New Year's Day, 1 March of a leap year, 29 February.
DAYS = ["2026-12-01", "2026-12-14", "2026-12-15", "2026-12-31", "2027-01-01", "2028-03-01", "2028-02-29"]


@pytest.mark.parametrize("today", DAYS)
@pytest.mark.parametrize("count", [14, 2, 1])
def test_the_demos_past_nights_always_reach_into_the_previous_month(today, count):
    """Issue 23 outcome 7: whatever today is, the history spans a month boundary, so the Billing view
    has a closed month (rule 15) and an open one, tonight's."""
    today = dt.date.fromisoformat(today)
    dates = past_night_dates(today, count)
    first_of_month = dt.date(today.year, today.month, 1)
    assert len(dates) == count
    if count > 1 or today.day == 1:  # the newest is last night ("Since last night" is a day), unless the
        assert dates[-1] == today - dt.timedelta(days=1)  # one night asked for must be the previous month's
    assert dates[0] < first_of_month  # a night of the previous month
    assert dates[0] >= first_of_month - dt.timedelta(days=count)  # and no older than needed
    # One a day, oldest first, up to last night; a gap only where the oldest had to move back.
    assert dates[1:] == [today - dt.timedelta(days=back) for back in range(count - 1, 0, -1)]
    assert sorted(set(dates)) == dates


@pytest.mark.parametrize("today, shifted", [("2026-12-15", "2026-11-30"), ("2027-01-20", "2026-12-31"),
                                            ("2028-03-31", "2028-02-29"), ("2026-12-14", "2026-11-30")])
def test_after_the_14th_the_oldest_past_night_is_the_previous_months_last_day(today, shifted):
    assert past_night_dates(dt.date.fromisoformat(today), 14)[0] == dt.date.fromisoformat(shifted)


def test_no_past_nights_asked_for_is_tonight_only():
    assert past_night_dates(dt.date(2026, 12, 20), 0) == []
    assert history_plan(dt.date(2026, 12, 20), 0, []) == ([], 0)


def test_a_data_directory_with_kept_nights_keeps_them_and_adds_tonight_as_the_next_simulator_night():
    """Issue 26: past nights older than a kept one would be refused (rule 11), so none are run again."""
    kept = [dt.date(2026, 11, 30), *(dt.date(2026, 12, d) for d in range(7, 21))]
    assert history_plan(dt.date(2026, 12, 21), 14, kept) == ([], 15)  # the next day: the data evolves
    assert history_plan(dt.date(2026, 12, 20), 14, kept) == ([], 14)  # the same day again: tonight re-run
    assert history_plan(dt.date(2026, 12, 20), 14, []) == (past_night_dates(dt.date(2026, 12, 20), 14), 14)


@pytest.mark.slow
def test_a_night_dated_before_a_kept_one_fails_the_demo_in_one_line_and_is_not_retried(tmp_path):
    """Issue 26: a clock error cannot pass on a retry minutes later, so the step is not retried (its
    retry sleep was what failed under libfaketime), and the demo says the cause, not Dagster's trace."""
    import time_machine
    from dagster import DagsterEventType, DagsterInstance

    from m365_pipeline.demo import run_pipeline_once
    from m365_pipeline.simulator import Simulator

    saved_env, saved_handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    env = {"M365_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "data").mkdir()
    try:
        with Simulator(SimulatorConfig(), host="127.0.0.1", port=0) as sim, DagsterInstance.ephemeral() as instance:
            for day, expect_failure in [(dt.date(2026, 12, 2), False), (dt.date(2026, 12, 1), True)]:
                with time_machine.travel(dt.datetime.combine(day, dt.time(23), dt.UTC)), \
                        contextlib.ExitStack() as stack:
                    if expect_failure:
                        failed = stack.enter_context(pytest.raises(SystemExit))
                    run_pipeline_once({**env, **sim.env}, instance)
            events = [entry.dagster_event.event_type for run in instance.get_runs()
                      for entry in instance.all_logs(run.run_id) if entry.dagster_event]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
    (message,) = str(failed.value).splitlines()
    assert message == ("[demo] the pipeline run failed: dashboard_api: m365_pipeline.assets.nights.NightOutOfOrder: "
                       "tonight's collection date 2026-12-01 is before the latest kept night 2026-12-02; check the "
                       "clock of the machine running the pipeline. Nothing was published.")
    assert events.count(DagsterEventType.STEP_FAILURE) == 1
    assert DagsterEventType.STEP_UP_FOR_RETRY not in events
