"""The shipped production setup, for real: PostgreSQL, dagster-daemon and dagster-webserver on
deploy/dagster.yaml, the 23:00 schedule firing, a second run waiting in the queue, a re-execution
and the schedule switched off and on from the webserver's API, all reaching the daemon."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from m365_pipeline.definitions import NIGHTLY_JOB, NIGHTLY_SCHEDULE
from m365_pipeline.processes import free_port, wait_for_port

from .helpers import BIN
from .test_unattended import ROOT, cli_env

pytestmark = pytest.mark.slow  # PostgreSQL, two Dagster services, and waits for a real schedule tick

LOCATION = "m365_pipeline"
REPOSITORY = "__repository__"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql (make test-system-packages does)")
    return found


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    """A private PostgreSQL on 127.0.0.1 (as the postgres user when we are root: initdb refuses root)."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="m365-pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    port = free_port()
    cluster = str(home / "db")
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", cluster, "-A", "trust", "-U", "dagster"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", cluster, "-l", str(home / "log"), "-w", "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield {"M365_DAGSTER_PG_HOST": "127.0.0.1", "M365_DAGSTER_PG_PORT": str(port),
               "M365_DAGSTER_PG_DB": "postgres", "M365_DAGSTER_PG_USER": "dagster",
               "M365_DAGSTER_PG_PASSWORD": "unused-trust-auth"}
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", cluster, "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)


def zone_where_2300_is_soon(directory: Path, lead_s: int = 75) -> tuple[str, str]:
    """A time zone (compiled with zic into ``directory``) whose 23:00 is about ``lead_s`` seconds away.

    Real zones put 23:00 only at whole quarter hours of UTC; this one is a fixed offset, whole minutes.
    """
    fire = (datetime.now(UTC) + timedelta(seconds=lead_s + 60)).replace(second=0, microsecond=0)
    offset = (23 * 60 - (fire.hour * 60 + fire.minute)) % 1440
    offset = offset - 1440 if offset > 720 else offset
    sign = "-" if offset < 0 else ""
    (directory / "src").write_text(f"Zone M365Test/Soon {sign}{abs(offset) // 60}:{abs(offset) % 60:02d} - TST\n")
    subprocess.run(["zic", "-d", str(directory / "zones"), str(directory / "src")], check=True, timeout=30)
    return "M365Test/Soon", f"{directory / 'zones'}:/usr/share/zoneinfo"


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


@pytest.mark.timeout(900)  # bounded: ~2 min to the tick, then three short runs and a few CLI calls
def test_production_setup_on_postgresql_schedule_queue_reexecution_and_schedule_toggle(
        postgres, start_simulator, tmp_path):
    # Source S's user list answers after 15 s (the first two times), so each run lasts a while.
    sim = start_simulator(orgs=4, users_per_org=6, seed=9, slow_match=r"/users\?page_size", slow_ms=15_000)
    zone, tzpath = zone_where_2300_is_soon(tmp_path)
    env = cli_env(tmp_path, sim, **postgres, M365_SCHEDULE_TIMEZONE=zone, PYTHONTZPATH=tzpath)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("daemon", "webserver")}
    commands = {"daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                "webserver": [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                              "-p", str(port)]}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():  # as the units in deploy/ start them
            with logs[name].open("w") as out:
                procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        wait_for_port(port, procs["webserver"], timeout=120)
        api = Dagit(port)
        wait_until("the webserver to load the code location", lambda: "scheduleState" in api.schedule(), 120)

        # 1. The 23:00 schedule fires (in the zone whose 23:00 is now) and its run starts.
        def scheduled() -> dict | None:
            return next((run for run in api.runs() if {"key": "dagster/schedule_name", "value": NIGHTLY_SCHEDULE}
                         in run["tags"] and run["status"] == "STARTED"), None)
        first = wait_until("the scheduled run to start", scheduled, 240)

        # 2. A second run launched through the webserver while it runs waits in the queue, then succeeds.
        launched = api("""mutation ($p: ExecutionParams!) { launchRun(executionParams: $p) {
                            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                       p={"selector": JOB, "mode": "default"})["launchRun"]
        second = launched["run"]["runId"]
        time.sleep(5)
        assert api.run(first["runId"])["status"] == "STARTED"
        assert api.run(second)["status"] == "QUEUED", "a second run started alongside the first"
        for run_id in (first["runId"], second):
            status = wait_until(f"run {run_id} to finish",
                                lambda r=run_id: api.run(r)["status"] in ("SUCCESS", "FAILURE", "CANCELED")
                                and api.run(r)["status"], 300)
            assert status == "SUCCESS", (run_id, logs["daemon"].read_text()[-3000:])

        # 3. Re-executing the scheduled run from the UI's API works under the one location name.
        again = api("""mutation ($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {
                         __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                    p={"parentRunId": first["runId"], "strategy": "ALL_STEPS"})["launchRunReexecution"]
        assert again["__typename"] == "LaunchRunSuccess", again
        rerun = again["run"]["runId"]
        wait_until("the re-execution to succeed", lambda: api.run(rerun)["status"] == "SUCCESS", 300)

        # 4. The schedule switched off and on in the UI: the daemon's view of the instance (the same
        #    workspace.yaml, so the same location name and schedule state) follows.
        def daemon_sees(status: str) -> bool:
            listed = subprocess.run([str(BIN / "dagster"), "schedule", "list", "-w", "workspace.yaml",
                                     f"--{status}", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=120, check=False)
            return NIGHTLY_SCHEDULE in listed.stdout

        state = api.schedule()["scheduleState"]
        stopped = api("""mutation ($id: String) { stopRunningSchedule(id: $id) { __typename
                           ... on ScheduleStateResult { scheduleState { status } } } }""", id=state["id"])
        assert stopped["stopRunningSchedule"]["scheduleState"]["status"] == "STOPPED", stopped
        assert daemon_sees("stopped") and not daemon_sees("running")
        started = api("""mutation ($s: ScheduleSelector!) { startSchedule(scheduleSelector: $s) { __typename
                           ... on ScheduleStateResult { scheduleState { status } } } }""", s=SCHEDULE)
        assert started["startSchedule"]["scheduleState"]["status"] == "RUNNING", started
        assert daemon_sees("running")
    finally:
        for proc in procs.values():
            stop(proc)
