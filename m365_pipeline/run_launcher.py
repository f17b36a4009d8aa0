"""Dagster's default run launcher, taught to tell whether the run worker it started is still alive.

A run worker is a process on this machine, started for each run by the code server the daemon spawned
(deploy/dagster.yaml's ``run_launcher``). If only the worker dies, the code server notices and fails
the run; if the code server dies with it (``kill -9`` of both, the OOM killer taking the unit down, a
daemon restart), nothing does, and the run stays STARTED, holding the one-run-per-location queue
until run monitoring's 4 h limit. Dagster's run monitoring asks the launcher each
``poll_interval_seconds`` whether a STARTED run's worker is alive (``check_run_worker_health``);
``DefaultRunLauncher`` cannot say, this one can: the worker logs ``Started process for run (pid: N)``
before the run becomes STARTED, so every STARTED run it launched names its process. The run is failed
(the usual failure alert, run retries, the queue moves on) when that process is gone: no such pid, a
zombie, or a pid reused by a process that started after the worker did.

The usual failure alert comes from a run-failure sensor, which starts from the newest failure at its
first tick: a run failed before that tick (the daemon's first start on an instance where a run had
died, its monitoring faster than its sensors) would never be alerted. Until the sensor has ticked,
a dead worker is reported as running, and the run is failed at a later poll.

A run the CLI executes in its own process (the README's ``dagster asset materialize``) has no such
event; its DuckDB resource tags the run with the process instead (``record_cli_worker``), so a killed
CLI run is failed the same way and no longer makes the schedule skip its tick. What it cannot judge it
reports as running, leaving the run to the 4 h limit: a worker on another machine. A run that dies
before it is STARTED is ended by ``start_timeout_seconds``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DefaultRunLauncher
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.scheduler.instigation import InstigatorStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from m365_pipeline.sensors import FAILURE_SENSOR

WORKER_STARTED = "Started process for run"  # Dagster's engine event, with the worker's pid in its metadata
CLI_WORKER_TAG = "m365/cli_run_worker"  # {"host", "pid", "at"} of a run executing in the CLI's process
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# How much later than its "Started process" event a process may seem to have started and still be the
# worker: the event is logged after the process starts, and the start is read against a boot time in
# whole seconds. Beyond this the pid was reused (pids are not reused that fast).
START_SLACK_S = 60
PROC = Path("/proc")


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` with ``check_run_worker_health`` for workers on this machine."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        worker = recorded_worker(self._instance, run)
        if worker is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker recorded on this machine; not judged")
        pid, started_at = worker
        gone = worker_gone(pid, started_at)
        if gone and not failure_alerts_watching(self._instance):
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"the run worker (pid {pid}) is gone: {gone}; failed "
                                        f"once {FAILURE_SENSOR} has had its first tick, so that it is alerted")
        if gone:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"the run worker (pid {pid}) is gone: {gone}; the "
                                        "run was killed (SIGKILL, the OOM killer, a restart of the daemon)")
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")


def failure_alerts_watching(instance: DagsterInstance) -> bool:
    """Whether the failure alert sensor has had its first tick on this instance (it has a cursor), or
    was turned off in the UI (no alert to wait for)."""
    return any(state.name == FAILURE_SENSOR and (state.status == InstigatorStatus.STOPPED or (
        state.instigator_data is not None and state.instigator_data.cursor is not None))
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR))


def record_cli_worker(instance: DagsterInstance, run: DagsterRun) -> None:
    """Tag a run that executes in this process, neither launched by a code server (which records its
    worker itself) nor a step process of a multiprocess run (which ends before its run does)."""
    if GRPC_INFO_TAG in run.tags or _cli_worker(run) or multiprocessing.parent_process() is not None:
        return
    instance.add_run_tags(run.run_id, {CLI_WORKER_TAG: json.dumps(
        {"run_id": run.run_id, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})})


def _cli_worker(run: DagsterRun) -> dict | None:
    """The run's own CLI worker tag; one a re-execution or retry inherited from its parent names another run."""
    cli = json.loads(run.tags.get(CLI_WORKER_TAG) or "{}")
    return cli if cli.get("run_id") == run.run_id else None


def recorded_worker(instance: DagsterInstance, run: DagsterRun) -> tuple[int, float] | None:
    """(pid, when it said it started) of the run's last worker, if that runs on this machine."""
    grpc = json.loads(run.tags.get(GRPC_INFO_TAG) or "{}")
    if not grpc:
        cli = _cli_worker(run)
        return (int(cli["pid"]), float(cli["at"])) if cli and cli.get("host") == socket.gethostname() else None
    if grpc.get("host") not in LOCAL_HOSTS:
        return None
    for entry in reversed(instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)):
        event = entry.dagster_event
        pid = event and event.event_specific_data and event.event_specific_data.metadata.get("pid")
        if pid is not None and (event.message or "").startswith(WORKER_STARTED):
            return int(pid.value), entry.timestamp
    return None


def worker_gone(pid: int, started_at: float, proc: Path = PROC) -> str | None:
    """Why process ``pid``, which said it started at ``started_at`` (epoch seconds), is no longer
    running, or None if it still is (or this machine cannot tell: no /proc)."""
    if not proc.is_dir():
        return None
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return "no such process"
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    state, start_ticks = fields[0], int(fields[19])  # stat fields 3 and 22
    if state in ("Z", "X"):
        return "it has exited (a zombie)"
    boot = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                if line.startswith("btime "))
    start = boot + start_ticks / os.sysconf("SC_CLK_TCK")
    if start > started_at + START_SLACK_S:
        return f"pid {pid} now belongs to a process started after the worker"
    return None
