"""A killed run does not hold back the next night (issue 25, outcome 5): the run worker SIGKILLed with
the daemon and its code server, as the OOM killer or ``systemctl kill`` takes the unit down, is failed by
run monitoring (m365_pipeline/run_launcher.py) once the daemon is back; the failure alert goes out, its
DuckDB pool slot is freed, and the run queued behind it starts and publishes. Real PostgreSQL, dagster-daemon
and dagster-webserver on deploy/dagster.yaml, with only the poll interval shortened."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.run_launcher import START_SLACK_S, worker_gone
from m365_pipeline.simulator import ground_truth

from .helpers import BIN, Receiver
from .test_production_postgres import JOB, Dagit, postgres, stop, wait_until  # noqa: F401 (postgres: a fixture)
from .test_unattended import ROOT, cli_env, published_summary

SHIPPED = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
BOUND_S = 300  # issue 25: a dead run worker is detected and the queue moves on within 5 minutes
TEST_POLL_S = 5


def test_the_shipped_monitoring_fails_a_dead_worker_and_frees_its_slot_within_the_bound():
    monitoring = SHIPPED["run_monitoring"]
    assert SHIPPED["run_launcher"] == {"module": "m365_pipeline.run_launcher", "class": "LocalRunLauncher"}
    # A STARTED run: failed at the next poll (one more on an instance whose failure sensor has not ticked
    # yet, run_launcher.failure_alerts_watching); its slot freed at the first poll after the grace period.
    started = 2 * monitoring["poll_interval_seconds"] + monitoring["free_slots_after_run_end_seconds"] \
        + monitoring["poll_interval_seconds"]
    # A run killed before it was STARTED: failed by the start timeout, at the next poll.
    starting = monitoring["start_timeout_seconds"] + monitoring["poll_interval_seconds"]
    assert max(started, starting) < BOUND_S - 60  # a minute for the daemon's restart and the queue
    assert monitoring["max_resume_run_attempts"] == 0  # failed, then retried as a new run, never resumed


def test_worker_gone_tells_a_live_worker_from_a_dead_one_a_zombie_and_a_reused_pid():
    alive = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["true"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        started = time.time()
        assert worker_gone(alive.pid, started) is None
        wait_until("the zombie to exit", lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0]
                   == "Z", 10, every=0.1)
        assert worker_gone(zombie.pid, started) == "it has exited (a zombie)"
        assert worker_gone(dead.pid, started) == "no such process"
        # The pid is there, but its process started long after the worker said it had: a reused pid.
        assert "started after the worker" in worker_gone(alive.pid, started - START_SLACK_S - 3600)
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


def test_a_cli_worker_tag_counts_only_for_its_own_run_never_for_a_retry_or_reexecution_that_inherited_it(
        monkeypatch, tmp_path):
    import json
    import socket

    from dagster import DagsterRunStatus, instance_for_test

    from m365_pipeline import definitions as code_location
    from m365_pipeline.run_launcher import CLI_WORKER_TAG, recorded_worker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M365_DATA_DIR", str(tmp_path / "data"))
    job = code_location.defs().resolve_job_def(code_location.NIGHTLY_JOB)
    with instance_for_test() as instance:
        parent = instance.create_run_for_job(job_def=job, status=DagsterRunStatus.STARTED)
        tag = {"run_id": parent.run_id, "host": socket.gethostname(), "pid": 4242, "at": 1.5}
        instance.add_run_tags(parent.run_id, {CLI_WORKER_TAG: json.dumps(tag)})
        assert recorded_worker(instance, instance.get_run_by_id(parent.run_id)) == (4242, 1.5)
        child = instance.create_run_for_job(job_def=job, status=DagsterRunStatus.STARTED,
                                            tags={CLI_WORKER_TAG: json.dumps(tag)})  # as a retry copies tags
        assert recorded_worker(instance, child) is None  # not judged by its parent's dead process
        elsewhere = instance.create_run_for_job(job_def=job, status=DagsterRunStatus.STARTED)
        instance.add_run_tags(elsewhere.run_id, {CLI_WORKER_TAG: json.dumps(
            {**tag, "run_id": elsewhere.run_id, "host": "another-machine"})})
        assert recorded_worker(instance, instance.get_run_by_id(elsewhere.run_id)) is None


def _worker_pid(api: Dagit, run_id: str) -> int | None:
    events = api("""query ($id: ID!) { runOrError(runId: $id) { ... on Run { eventConnection {
                     events { __typename ... on EngineEvent { message } } } } } }""",
                 id=run_id)["runOrError"]["eventConnection"]["events"]
    started = [re.search(r"Started process for run \(pid: (\d+)\)", e.get("message") or "") for e in events]
    return next((int(m[1]) for m in started if m), None)


def _status(api: Dagit, run_id: str) -> str:
    return api.run(run_id)["status"]



@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_killed_with_its_daemon_is_failed_with_an_alert_and_the_queued_run_starts_within_the_bound(
        postgres, start_simulator, tmp_path):  # noqa: F811 (postgres: the fixture)
    # Source S's user list answers after 25 s (the first two times): the first run is surely mid-pull.
    sim = start_simulator(orgs=4, users_per_org=6, seed=11, slow_match=r"/users\?page_size", slow_ms=25_000)
    hook = Receiver()
    port = free_port()
    env = cli_env(tmp_path, sim, **postgres, M365_ALERT_WEBHOOK_URL=hook.url,
                  M365_DAGSTER_UI_URL=f"http://127.0.0.1:{port}")
    instance = {**SHIPPED, "run_monitoring": {**SHIPPED["run_monitoring"], "poll_interval_seconds": TEST_POLL_S}}
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(yaml.safe_dump(instance))
    logs = {name: tmp_path / f"{name}.log" for name in ("daemon", "webserver", "daemon-restarted")}
    daemon = [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"]

    def start(name: str, command: list[str]) -> subprocess.Popen:  # as the units in deploy/ start them
        with logs[name].open("w") as out:
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    procs = {"daemon": start("daemon", daemon),
             "webserver": start("webserver", [str(BIN / "dagster-webserver"), "-w", "workspace.yaml",
                                              "-h", "127.0.0.1", "-p", str(port)])}
    try:
        wait_for_port(port, procs["webserver"], timeout=120)
        api = Dagit(port)
        wait_until("the webserver to load the code location", lambda: "scheduleState" in api.schedule(), 120)

        # The killed night is not retried here, so its failure is final and alerted at once.
        killed = api("""mutation ($p: ExecutionParams!) { launchRun(executionParams: $p) {
                         __typename ... on LaunchRunSuccess { run { runId } } } }""",
                     p={"selector": JOB, "mode": "default", "executionMetadata": {
                         "tags": [{"key": "dagster/max_retries", "value": "0"}]}})["launchRun"]["run"]["runId"]
        pid = wait_until("the run's worker to start", lambda: _status(api, killed) == "STARTED"
                         and _worker_pid(api, killed), 180, every=0.5)
        queued = api.launch()
        time.sleep(3)
        assert _status(api, queued) == "QUEUED" and _status(api, killed) == "STARTED"

        # The whole daemon unit dies (daemon, code server, run worker), then systemd's Restart= starts it.
        assert os.getpgid(pid) == procs["daemon"].pid, "the run worker is not in the daemon's process group"
        os.killpg(procs["daemon"].pid, signal.SIGKILL)
        procs["daemon"].wait()
        killed_at = time.monotonic()
        wait_until("the run worker to die", lambda: worker_gone(pid, time.time()), 10, every=0.2)
        assert _status(api, killed) == "STARTED"  # nobody is left to say otherwise
        procs["daemon"] = start("daemon-restarted", daemon)

        assert wait_until("the killed run to be failed", lambda: _status(api, killed) in ("FAILURE", "SUCCESS")
                          and _status(api, killed), BOUND_S) == "FAILURE"
        wait_until("the queued run to start", lambda: _status(api, queued) in ("STARTED", "SUCCESS", "FAILURE"),
                   BOUND_S - (time.monotonic() - killed_at))
        assert time.monotonic() - killed_at < BOUND_S
        assert wait_until("the queued run to finish", lambda: _status(api, queued) in ("SUCCESS", "FAILURE")
                          and _status(api, queued), 300) == "SUCCESS", logs["daemon-restarted"].read_text()[-3000:]
        assert published_summary(tmp_path / "data")["totals"] == ground_truth(sim.dataset)["totals"]

        # The usual failure alert, for the killed run, saying why.
        messages = [m for m in hook.wait_for(1, timeout=300) if m["run_id"] == killed]
        assert [m["kind"] for m in messages] == ["failed"], hook.messages()
        assert f"the run worker (pid {pid}) is gone" in messages[0]["reason"], messages[0]
    finally:
        for proc in procs.values():
            stop(proc)
        hook.server.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_cli_run_on_the_make_dev_instance_is_failed_with_an_alert_and_the_schedule_fires_again(
        start_simulator, tmp_path):
    from dagster import DagsterInstance, build_schedule_context

    from m365_pipeline import definitions as code_location
    from m365_pipeline.demo import DAGSTER_YAML
    from m365_pipeline.run_launcher import CLI_WORKER_TAG, failure_alerts_watching

    from .test_unattended import materialize_all, materialize_args, wait_for_line

    sim = start_simulator(orgs=4, users_per_org=6, seed=12, slow_match=r"/users\?page_size", slow_ms=25_000)
    hook = Receiver()
    env = cli_env(tmp_path, sim, M365_ALERT_WEBHOOK_URL=hook.url)
    home = Path(env["DAGSTER_HOME"])
    dev = yaml.safe_load(DAGSTER_YAML)  # make dev's instance: SQLite, the rest as deploy/dagster.yaml
    dev["run_monitoring"]["poll_interval_seconds"] = TEST_POLL_S
    (home / "dagster.yaml").write_text(yaml.safe_dump(dev))
    schedule = code_location.defs().resolve_schedule_def(code_location.NIGHTLY_SCHEDULE)
    log = tmp_path / "cli.log"
    cli = daemon = None
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            # The night dies before make dev's daemon has ever run on this instance (the hardest case: its
            # run monitoring may then find the dead worker before the failure sensor's first tick).
            with log.open("w") as out:
                cli = subprocess.Popen(materialize_args(), cwd=tmp_path, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            wait_for_line(log, cli, 'Started execution of step "raw__saas_users"')
            os.killpg(cli.pid, signal.SIGKILL)  # mid-pull, as the OOM killer would
            cli.wait()
            killed_at = time.monotonic()
            run = instance.get_run_records(limit=1)[0].dagster_run
            assert run.status.value == "STARTED" and f'"pid": {cli.pid}' in run.tags[CLI_WORKER_TAG]
            held = schedule.evaluate_tick(build_schedule_context(instance=instance)).skip_message
            assert held and run.run_id in held, held  # the dead night holds the schedule back
            # A run-failure sensor starts from the newest failure at its first tick: failed before it, the
            # run would never be alerted. So the launcher waits for that tick before failing it.
            assert not failure_alerts_watching(instance)
            health = instance.run_launcher.check_run_worker_health(run)
            assert health.status.value == "RUNNING" and "first tick" in health.msg, health

            with (tmp_path / "daemon.log").open("w") as out:
                daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            wait_until("the killed CLI run to be failed", lambda: instance.get_run_by_id(run.run_id).is_finished,
                       BOUND_S)
            assert instance.get_run_by_id(run.run_id).status.value == "FAILURE"
            assert time.monotonic() - killed_at < BOUND_S
            tick = schedule.evaluate_tick(build_schedule_context(instance=instance))
            assert len(tick.run_requests or []) == 1, tick.skip_message  # the next night is not held back
        # The usual failure alert, within the same bound: the CLI's job has no run retries to wait for.
        hook.wait_for(1, timeout=BOUND_S - (time.monotonic() - killed_at))
        messages = [m for m in hook.messages() if m["run_id"] == run.run_id]
        assert [m["kind"] for m in messages] == ["failed"], \
            (hook.messages(), (tmp_path / "daemon.log").read_text()[-3000:])
        assert f"the run worker (pid {cli.pid}) is gone" in messages[0]["reason"], messages[0]
        again = materialize_all(env, tmp_path)  # its DuckDB pool slot was freed
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        assert published_summary(tmp_path / "data")["totals"] == ground_truth(sim.dataset)["totals"]
    finally:
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        if daemon is not None:
            stop(daemon)
        hook.server.shutdown()
