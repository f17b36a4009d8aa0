"""The shipped production setup, for real: PostgreSQL, dagster-daemon and dagster-webserver on
deploy/dagster.yaml. The schedule switched off from the webserver's API lets a 23:00 pass, switched on
it fires at the next; a second run waits in the queue; a re-execution runs; a failed night sends one
alert to a webhook on 127.0.0.1, without a token."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from m365_pipeline.definitions import NIGHTLY_JOB, NIGHTLY_SCHEDULE
from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.simulator import FaultConfig, Simulator

from .helpers import BIN, Receiver
from .test_unattended import ROOT, cli_env

pytestmark = pytest.mark.slow  # PostgreSQL, two Dagster services, and waits for a real schedule tick

LOCATION = "m365_pipeline"
REPOSITORY = "__repository__"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql (make test-system-packages does)")
    return found


def _pg(as_user: list[str], *args: str, log: Path | None = None) -> None:
    """Run a PostgreSQL tool; when it fails, fail with its own message (and the server's log)."""
    done = subprocess.run([*as_user, _pg_bin(args[0]), *args[1:]], capture_output=True, text=True, timeout=120)
    if done.returncode:
        server_log = log.read_text(errors="replace") if log is not None and log.exists() else ""
        pytest.fail(f"{args[0]} exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
                    + (f"\nserver log:\n{server_log.strip()}" if server_log else ""), pytrace=False)


def cluster_parent(as_user: list[str]) -> str | None:
    """Where the cluster directory goes: under TMPDIR for ourselves; when root, under the postgres user's
    home, since TMPDIR may be a private (mode 0700) directory that user cannot reach."""
    return pwd.getpwnam("postgres").pw_dir if as_user else None


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    """A private PostgreSQL on 127.0.0.1 (as the postgres user when we are root: initdb refuses root)."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="m365-pg-", dir=cluster_parent(as_user)))
    if as_user:
        shutil.chown(home, "postgres")
    port = free_port()
    cluster, log = str(home / "db"), home / "log"
    try:
        _pg(as_user, "initdb", "-D", cluster, "-A", "trust", "-U", "dagster")
        _pg(as_user, "pg_ctl", "-D", cluster, "-l", str(log), "-w", "-o",
            f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start", log=log)
        yield {"M365_DAGSTER_PG_HOST": "127.0.0.1", "M365_DAGSTER_PG_PORT": str(port),
               "M365_DAGSTER_PG_DB": "postgres", "M365_DAGSTER_PG_USER": "dagster",
               "M365_DAGSTER_PG_PASSWORD": "unused-trust-auth"}
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", cluster, "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)


def zone_where_2300_comes_twice(directory: Path, lead_s: int = 120) -> tuple[str, str, datetime, datetime]:
    """A time zone (compiled with zic into ``directory``) whose 23:00 is about ``lead_s`` seconds away and
    comes again a minute later; returns (zone, PYTHONTZPATH, first 23:00, second 23:00) in UTC.

    Real zones put 23:00 only at whole quarter hours of UTC; this one is a fixed offset, whole minutes.
    Half a minute after the first 23:00 it skips a day less one minute, as Samoa skipped 30 December
    2011, so the next day's 23:00 is one minute after the first: two real schedule ticks in a test.
    """
    first = (datetime.now(UTC) + timedelta(seconds=lead_s + 60)).replace(second=0, microsecond=0)
    before = (23 * 60 - (first.hour * 60 + first.minute)) % 1440 - 1440  # minutes; (-24 h, 0]: room to jump
    after = before + 1440 - 1

    def hours(minutes: int) -> str:
        return f"{'-' if minutes < 0 else ''}{abs(minutes) // 60}:{abs(minutes) % 60:02d}"

    jump = first + timedelta(seconds=30)
    (directory / "src").write_text(f"Zone M365Test/Soon {hours(before)} - TST {jump:%Y %b %d %H:%M:%S}u\n"
                                   f"\t\t\t{hours(after)} - TSU\n")
    # zic is in /usr/sbin, which a normal user's PATH on Debian leaves out.
    zic = shutil.which("zic") or shutil.which("zic", path="/usr/sbin:/sbin") or "zic"
    subprocess.run([zic, "-d", str(directory / "zones"), str(directory / "src")], check=True, timeout=30)
    return "M365Test/Soon", f"{directory / 'zones'}:/usr/share/zoneinfo", first, first + timedelta(minutes=1)


class Dagit:
    """The webserver's GraphQL API, as the UI uses it."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        body = requests.post(self.url, json={"query": query, "variables": variables}, timeout=60).json()
        assert "errors" not in body, body
        return body["data"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self("""query ($id: ID!) { runOrError(runId: $id) { ... on Run { runId status tags { key value } }
                        ... on PythonError { message } } }""", id=run_id)["runOrError"]

    def runs(self) -> list[dict[str, Any]]:
        return self("""{ runsOrError { ... on Runs { results { runId status
                         tags { key value } } } } }""")["runsOrError"]["results"]

    def launch(self) -> str:
        launched = self("""mutation ($p: ExecutionParams!) { launchRun(executionParams: $p) {
                            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                        p={"selector": JOB, "mode": "default"})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def schedule(self) -> dict[str, Any]:
        return self("""query ($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) {
                         ... on Schedule { id scheduleState { id status } } ... on PythonError { message } } }""",
                    s=SCHEDULE)["scheduleOrError"]


SCHEDULE = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "scheduleName": NIGHTLY_SCHEDULE}
JOB = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": NIGHTLY_JOB}


def wait_until(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tag(run: dict[str, Any], key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def finished(api: Dagit, run_id: str, timeout: float = 300) -> str:
    return wait_until(f"run {run_id} to finish", lambda: api.run(run_id)["status"] in ("SUCCESS", "FAILURE", "CANCELED")
                      and api.run(run_id)["status"], timeout)


@pytest.mark.timeout(900)  # bounded: ~3 min to the ticks, then five short runs
def test_production_setup_on_postgresql_schedule_toggle_queue_reexecution_and_alerts(
        postgres, start_simulator, tmp_path):
    # Source S's user list answers after 15 s (the first two times), so each run lasts a while.
    sim = start_simulator(orgs=4, users_per_org=6, seed=9, slow_match=r"/users\?page_size", slow_ms=15_000)
    hook = Receiver()
    zone, tzpath, first_2300, second_2300 = zone_where_2300_comes_twice(tmp_path)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = cli_env(tmp_path, sim, **postgres, M365_SCHEDULE_TIMEZONE=zone, PYTHONTZPATH=tzpath,
                  M365_ALERT_WEBHOOK_URL=hook.url, M365_DAGSTER_UI_URL=ui)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    logs = {name: tmp_path / f"{name}.log" for name in ("daemon", "webserver")}
    commands = {"daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                "webserver": [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                              "-p", str(port)]}
    procs: dict[str, subprocess.Popen] = {}
    rejecting: Simulator | None = None
    try:
        for name, command in commands.items():  # as the units in deploy/ start them
            with logs[name].open("w") as out:
                procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        wait_for_port(port, procs["webserver"], timeout=120)
        api = Dagit(port)
        wait_until("the webserver to load the code location", lambda: "scheduleState" in api.schedule(), 120)

        # 1. The schedule switched off in the UI does not fire at 23:00; switched on again, it fires at the
        #    next 23:00: the daemon acts on the state the webserver set (one location name, one instance).
        state = api.schedule()["scheduleState"]

        def stop_schedule() -> bool:  # retried: the daemon may be storing the schedule's state at this moment
            stopped = api("""mutation ($id: String) { stopRunningSchedule(id: $id) { __typename
                               ... on ScheduleStateResult { scheduleState { status } }
                               ... on PythonError { message } } }""", id=state["id"])["stopRunningSchedule"]
            return stopped.get("scheduleState", {}).get("status") == "STOPPED"
        wait_until("the schedule to stop", stop_schedule, 30, every=2)
        assert datetime.now(UTC) < first_2300 - timedelta(seconds=5), "the services took too long to start"
        time.sleep(max(0.0, (first_2300 - datetime.now(UTC)).total_seconds()) + 2)
        started = api("""mutation ($s: ScheduleSelector!) { startSchedule(scheduleSelector: $s) { __typename
                           ... on ScheduleStateResult { scheduleState { status } } } }""", s=SCHEDULE)
        assert started["startSchedule"]["scheduleState"]["status"] == "RUNNING", started

        def scheduled() -> dict | None:
            return next((run for run in api.runs() if tag(run, "dagster/schedule_name") == NIGHTLY_SCHEDULE
                         and run["status"] == "STARTED"), None)
        first = wait_until("the re-enabled schedule's run to start", scheduled, 240)

        # 2. A second run launched through the webserver while it runs waits in the queue, then succeeds.
        second = api.launch()
        time.sleep(5)
        assert api.run(first["runId"])["status"] == "STARTED"
        assert api.run(second)["status"] == "QUEUED", "a second run started alongside the first"
        for run_id in (first["runId"], second):
            assert finished(api, run_id) == "SUCCESS", (run_id, logs["daemon"].read_text()[-3000:])

        # 3. Re-executing the scheduled run from the UI's API works under the one location name.
        again = api("""mutation ($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {
                         __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                    p={"parentRunId": first["runId"], "strategy": "ALL_STEPS"})["launchRunReexecution"]
        assert again["__typename"] == "LaunchRunSuccess", again
        assert finished(api, again["run"]["runId"]) == "SUCCESS"

        # Only the second 23:00 ticked: the stopped schedule let the first one pass.
        ticks = api("""query ($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) { ... on Schedule {
                         scheduleState { ticks { timestamp status runIds } } } } }""",
                    s=SCHEDULE)["scheduleOrError"]["scheduleState"]["ticks"]
        assert [(datetime.fromtimestamp(t["timestamp"], UTC), t["runIds"]) for t in ticks] == \
            [(second_2300, [first["runId"]])], ticks

        # 4. A failed night (the vendor now rejects our source S token) sends one alert, from the daemon's
        #    sensor on PostgreSQL storage; the good nights above sent none.
        assert hook.messages() == []
        vendor_port = sim.port
        sim.stop()
        rejecting = Simulator(replace(sim.config, saas_token="rotated-at-the-vendor", faults=FaultConfig()),
                              port=vendor_port).start()
        failed = api.launch()
        assert finished(api, failed) == "FAILURE"
        messages = hook.wait_for(1, timeout=180)
        time.sleep(35)  # one more sensor interval, and the run retry's outcome: nothing else may arrive
        messages = hook.messages()
        assert [m["kind"] for m in messages] == ["failed"], messages
        alert = messages[0]
        retried = {run["runId"] for run in api.runs() if run["runId"] == failed
                   or tag(run, "dagster/parent_run_id") == failed}
        assert alert["run_id"] in retried and alert["step"] == "raw__saas_users", alert
        assert alert["link"] == f"{ui}/runs/{alert['run_id']}"
        raw = b"".join(hook.bodies).decode()
        for token in (sim.config.saas_token, sim.config.reseller_token, sim.config.admin_token,
                      rejecting.config.saas_token):
            assert token not in raw
    finally:
        for proc in procs.values():
            stop(proc)
        if rejecting is not None:
            rejecting.stop()
        hook.server.shutdown()


def test_a_failing_postgresql_step_fails_with_the_tools_own_message(tmp_path):
    """make test under a private TMPDIR once failed here with initdb's message swallowed."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    occupied = tmp_path / "not-a-directory"
    occupied.write_text("")
    with pytest.raises(pytest.fail.Exception) as failed:
        _pg(as_user, "initdb", "-D", str(occupied / "db"))
    assert str(failed.value).startswith("initdb exited with 1: initdb: ")  # initdb's own words follow
