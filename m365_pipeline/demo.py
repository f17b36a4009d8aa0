"""``make demo`` and ``make dev``: the whole product on this machine with no vendor account.

demo: run the ``nightly_refresh`` job for each of the past two weeks' nights (at 23:00 UTC on its
      date, against the simulator as it was that night; a data directory with kept nights keeps
      them), then once tonight, and serve the API and dashboard.
dev:  start the simulator and ``dagster dev`` (UI on :3000) against the same data directory.
run:  run the ``nightly_refresh`` job once against the configured sources (``make run``).
Ctrl-C, SIGTERM to make, or SIGINT or SIGTERM to this process stops every process this started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from m365_pipeline.processes import port_is_free, read_simulator_banner, wait_for_port
from m365_pipeline.publishing import export_dir, published_manifest
from m365_pipeline.settings import DATA_DIR_VARIABLE, DataDirError, prepare_data_dir
from m365_pipeline.simulator.dataset import MAX_NIGHT

if TYPE_CHECKING:  # Dagster is imported when a run starts: the checks before it answer within a second
    from dagster import DagsterInstance, JobExecutionResult

BIN = Path(sys.executable).parent
# The shipped instance settings (one run at a time, run monitoring, retries, no telemetry), defined once.
DEPLOY_INSTANCE = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"


def dev_instance_yaml() -> str:
    """deploy/dagster.yaml without its PostgreSQL storage: ``make dev`` keeps Dagster's default SQLite
    storage and gets everything else, so a run left STARTED by a killed process is ended by the daemon's
    run monitoring instead of making the schedule skip every night."""
    settings = yaml.safe_load(DEPLOY_INSTANCE.read_text())
    settings.pop("storage")
    return ("# Project-local Dagster instance for `make demo` / `make dev` (DAGSTER_HOME was unset),\n"
            "# generated from deploy/dagster.yaml without its storage.\n" + yaml.safe_dump(settings, sort_keys=False))


DAGSTER_YAML = dev_instance_yaml()


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# Every port each mode listens on, by the variable that moves it (defaults as documented in the README).
PORT_DEFAULTS = {"M365_DEMO_PORT": 5400, "M365_DAGSTER_PORT": 3000, "M365_DEMO_SIMULATOR_PORT": 8765}
PORTS_BY_MODE = {"demo": ("M365_DEMO_SIMULATOR_PORT", "M365_DEMO_PORT"),
                 "dev": ("M365_DEMO_SIMULATOR_PORT", "M365_DAGSTER_PORT"), "run": ()}


def ports_needed(mode: str, env: dict[str, str]) -> dict[str, int]:
    """The ports ``mode`` needs, by variable; a value that is not a port is a one-line SystemExit."""
    ports = {}
    for variable in PORTS_BY_MODE[mode]:
        value = env.get(variable, "").strip() or str(PORT_DEFAULTS[variable])
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise SystemExit(f"[demo] {variable}={value!r} is not a port number (1-65535)")
        ports[variable] = int(value)
    return ports


def busy_port_messages(mode: str, ports: dict[str, int]) -> list[str]:
    """One line per port already taken, saying which variable moves it."""
    return [f"[demo] port {port} is in use (another `make {mode}`?); stop it or set {variable} to a free port"
            for variable, port in ports.items() if not port_is_free(port)]


def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    try:
        wait_for_port(port, proc, timeout)
    except (RuntimeError, TimeoutError):
        raise SystemExit(f"[demo] m365-serve did not start listening on port {port}; see its message above") from None


def prepare_environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("DAGSTER_HOME"):
        home = root / ".dagster_home"
        home.mkdir(exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists() or config.read_text() != DAGSTER_YAML:  # generated: kept current
            config.write_text(DAGSTER_YAML)
        env["DAGSTER_HOME"] = str(home)
    env.setdefault("M365_DATA_DIR", str(root / "data"))
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    return env


class Children:
    """Processes started here; all are stopped on exit, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        # Own process group, so Ctrl-C in the terminal reaches us once and we stop them in order.
        proc = subprocess.Popen(args, env=env, start_new_session=True, **kwargs)
        self.processes.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in 15 s; killing it")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # A leader gone may leave members of its group (dagster dev's code server, stopped as it started):
        # they get a few seconds, then nothing of ours is left running.
        deadline = time.monotonic() + 5
        while (alive := [proc for _, proc in self.processes if group_alive(proc.pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_simulator(children: Children, env: dict[str, str], port: int, *options: str) -> dict[str, str]:
    proc = children.start("simulator", [str(BIN / "m365-simulate"), "--port", str(port), *options], env,
                          stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    banner = read_simulator_banner(proc.stdout)
    if banner is None or proc.poll() is not None or "SAAS_API_BASE_URL" not in banner.env:
        raise SystemExit("[demo] the simulator did not start; see its message above")
    say(f"simulator: {banner.summary}")
    return banner.env


def nightly_job():
    """The nightly job, for ``reconstructable``: execute_job takes its executor's config, so a demo
    run can have its step retries off (execute_in_process always retries)."""
    from m365_pipeline.definitions import NIGHTLY_JOB, defs

    return defs().resolve_job_def(NIGHTLY_JOB)


CONSOLE_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def run_pipeline_once(env: dict[str, str], instance: DagsterInstance | None = None, retries: bool = True) -> None:
    """Run the nightly job in this process, recorded in ``instance`` (default: the Dagster instance
    `make dev` shows). Its warnings are printed one line each, a failure as its cause in one line: no
    Dagster trace reaches the terminal (the run's full log is in the instance). ``retries=False`` (the
    demo's runs: the simulator has no outage to wait out) turns the job's step retries off, so a stop
    asked for mid-run is not followed by a retry's sleep of minutes."""
    os.environ.update(env)
    from dagster import DagsterInstance, execute_job, reconstructable

    started = time.monotonic()
    run_config = {**CONSOLE_QUIET, "execution": {"config": {"retries": {"enabled" if retries else "disabled": {}}}}}
    with stop_requests_noted() as stop_requested:
        with contextlib.ExitStack() as stack:
            if instance is None:
                instance = stack.enter_context(DagsterInstance.get())
            result = stack.enter_context(execute_job(reconstructable(nightly_job), instance=instance,
                                                     run_config=run_config, raise_on_error=False))
            for message in run_warnings(instance, result.run_id):
                say(message)
            cause = None if result.success else failure_cause(result)
    if stop_requested():
        raise KeyboardInterrupt
    if cause is not None:
        raise SystemExit(f"[demo] the pipeline run failed: {cause}")
    say(f"pipeline run {result.run_id[:8]} succeeded in {time.monotonic() - started:.1f} s")


def run_warnings(instance: DagsterInstance, run_id: str) -> list[str]:
    """The run's own warnings (say, "first run into ..."), first line each; its errors are the failure,
    said once by ``failure_cause``."""
    return [entry.user_message.strip().splitlines()[0] for entry in instance.all_logs(run_id)
            if entry.dagster_event is None and entry.level == logging.WARNING and entry.user_message.strip()]


def failure_cause(result: JobExecutionResult) -> str:
    """The innermost error of the first failed step, in one line: what to fix, not Dagster's wrapping."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            return f"{event.step_key}: {error.message.strip().splitlines()[0]}"
    return "see the run in `make dev`"


# -- past nights ----------------------------------------------------------------------------------
PAST_NIGHTS = 14  # two weeks of history before tonight (docs/RULES.md, rule 11)


def past_night_dates(today: dt.date, count: int) -> list[dt.date]:
    """The past nights' dates, oldest first: the ``count`` days before ``today``; when those all fall
    in today's month (after the 14th), the oldest moves to the previous month's last day, so the
    history always spans a month boundary and the Billing view has a closed month (rules 14-15)."""
    dates = [today - dt.timedelta(days=back) for back in range(count, 0, -1)]
    first_of_month = today.replace(day=1)
    if dates and dates[0] >= first_of_month:
        dates[0] = first_of_month - dt.timedelta(days=1)
    return dates


def kept_nights(data_dir: Path) -> list[dt.date]:
    """The nights the served version keeps (rule 11), oldest first; none before the first publish."""
    manifest = published_manifest(export_dir(data_dir))
    return [dt.date.fromisoformat(night["date"]) for night in (manifest or {}).get("nights") or []]


def history_plan(today: dt.date, count: int, kept: list[dt.date]) -> tuple[list[dt.date], int]:
    """(past nights to run, the simulator night tonight is). A data directory with kept nights keeps
    them: the demo adds tonight only, as the simulator's next night (the night count before today),
    since a past night older than a kept one is refused (rule 11). Otherwise the past nights are the
    simulator's nights 0.. at ``past_night_dates``, and tonight the one after."""
    if kept:
        return [], min(sum(1 for night in kept if night < today), MAX_NIGHT)
    dates = past_night_dates(today, count)
    return dates, len(dates)


def past_nights_count(env: dict[str, str]) -> int:
    value = env.get("M365_DEMO_PAST_NIGHTS", "").strip() or str(PAST_NIGHTS)
    if not value.isdigit() or int(value) > MAX_NIGHT:
        raise SystemExit(f"[demo] M365_DEMO_PAST_NIGHTS={value!r} is not a number of nights (0-{MAX_NIGHT})")
    return int(value)


def run_past_nights(env: dict[str, str], dates: list[dt.date]) -> None:
    """Run the real job once per past night, oldest first, back to back in this process: the
    simulator serves that night's data, and the clock the pipeline reads (Python's, time-machine)
    says 23:00 UTC on its date. Monotonic clocks and sleeps stay real, so retries, timeouts and
    Dagster's own waits behave as on the night itself; libfaketime, which this replaced, made every
    sleep fail with EINVAL. The runs go to an in-memory Dagster instance (no run storage written per
    event, no compute-log tail processes): the nights they publish are in DuckDB and the served API,
    and `make dev` shows tonight's run."""
    import time_machine
    from dagster import DagsterInstance

    from m365_pipeline.simulator import Simulator, SimulatorConfig

    total = len(dates) + 1
    with DagsterInstance.ephemeral() as instance:
        for night, day in enumerate(dates):
            say(f"night {night + 1} of {total}: {day} (the pipeline at 23:00 UTC that day)")
            with Simulator(SimulatorConfig(night=night), host="127.0.0.1", port=0) as sim:
                with time_machine.travel(dt.datetime.combine(day, dt.time(23), dt.UTC)):
                    try:
                        run_pipeline_once({**env, **sim.env}, instance, retries=False)
                    except SystemExit as failed:
                        raise SystemExit(f"[demo] the run for {day} failed: {failed}".replace(
                            ": [demo] the pipeline run failed:", ":")) from None
    say(f"night {total} of {total}: tonight")


def demo(root: Path, env: dict[str, str], children: Children, ports: dict[str, int]) -> None:
    port = ports["M365_DEMO_PORT"]
    data_dir = Path(env["M365_DATA_DIR"])
    kept = kept_nights(data_dir)
    past, tonight = history_plan(dt.datetime.now(dt.UTC).date(), past_nights_count(env), kept)
    if kept:
        say(f"keeping the {len(kept)} nights in {data_dir} ({kept[0]} to {kept[-1]}) and adding tonight;"
            f" remove {data_dir} for a new history")
    run_past_nights(env, past)
    env.update(start_simulator(children, env, ports["M365_DEMO_SIMULATOR_PORT"], "--night", str(tonight)))
    run_pipeline_once(env, retries=False)
    server = children.start("m365-serve", [str(BIN / "m365-serve"), "--port", str(port), "--data-dir",
                                           str(data_dir), "--no-access-log"], env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=forward_server_output, args=(server.stdout,), daemon=True).start()
    wait_until_listening(port, server)
    base = f"http://127.0.0.1:{port}"
    print(f"""
  M365 Usage Dashboard   {base}/
  API                    {base}/api/m365/summary
                         {base}/api/m365/history   {base}/api/m365/changes?since=<YYYY-MM-DD>
                         {base}/api/m365/users?org=<name>
                         {base}/api/m365/export?format=csv   {base}/api/m365/billing
  DuckDB (analysts)      {BIN / 'duckdb'} -readonly {data_dir / 'analytics.duckdb'}
  DuckDB (pipeline)      {data_dir / 'm365.duckdb'}
  Dagster UI             make dev   (then http://127.0.0.1:3000)
  Vendor simulator       {env['SAAS_API_BASE_URL']} and {env['BACKUP_API_BASE_URL']}

  Ctrl-C stops everything this started.
""", flush=True)


def forward_server_output(lines: Iterable[str]) -> None:
    """m365-serve's own lines, warnings and errors reach the terminal; granian's routine ``[INFO]``
    lines about starting and stopping workers do not (the banner says where it listens)."""
    for line in lines:
        if not line.startswith("[INFO] "):
            print(line, end="", flush=True)


def dev(root: Path, env: dict[str, str], children: Children, ports: dict[str, int]) -> None:
    env.update(start_simulator(children, env, ports["M365_DEMO_SIMULATOR_PORT"]))
    port = str(ports["M365_DAGSTER_PORT"])
    say(f"Dagster UI on http://127.0.0.1:{port} (workspace.yaml); Ctrl-C stops it and the simulator")
    children.start("dagster dev", [str(BIN / "dagster"), "dev", "-w", str(root / "workspace.yaml"),
                                   "-h", "127.0.0.1", "-p", port], env, cwd=root)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM stop everything: installed explicitly, because a shell starts background
    jobs with SIGINT ignored and Python then keeps it ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)


@contextmanager
def stop_requests_noted() -> Iterator[Callable[[], bool]]:
    """Around an in-process Dagster run: it installs its own SIGINT/SIGTERM handlers, which note a
    signal and carry on, and on leaving maps SIGTERM to the handler it found (SIG_IGN for SIGINT in
    a background job). The interpreter writes every handled signal to the wakeup fd, so a stop asked
    for during the run is still seen afterwards; our handlers are reinstalled either way."""
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    os.set_blocking(writer, False)
    arrived = bytearray()
    previous = signal.set_wakeup_fd(writer)
    try:
        yield lambda: bool({signal.SIGINT, signal.SIGTERM} & set(arrived))
    finally:
        signal.set_wakeup_fd(previous)
        install_stop_handlers()
        with contextlib.suppress(BlockingIOError):
            arrived += os.read(reader, 1024)
        os.close(reader)
        os.close(writer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m365_pipeline.demo", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=list(PORTS_BY_MODE), default="demo")
    args = parser.parse_args(argv)
    install_stop_handlers()
    root = Path.cwd()
    env = prepare_environment(root)
    # Everything that can be wrong before anything starts: one line each, within a second.
    ports = ports_needed(args.mode, env)
    busy = busy_port_messages(args.mode, ports)
    if busy:
        raise SystemExit("\n".join(busy))
    try:
        prepare_data_dir(Path(env[DATA_DIR_VARIABLE]).resolve())
    except DataDirError as exc:
        raise SystemExit(f"[demo] {exc}") from None
    if args.mode == "run":
        try:
            run_pipeline_once(env)
        except KeyboardInterrupt:
            say("stopped")
            return 130
        return 0
    children = Children()
    try:
        (demo if args.mode == "demo" else dev)(root, env, children, ports)
        while all(proc.poll() is None for _, proc in children.processes):
            time.sleep(0.5)
        failed = [name for name, proc in children.processes if proc.poll() is not None]
        say(f"{', '.join(failed)} exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        # A second signal (make forwards SIGTERM, a service manager signals the whole group) must
        # not cut the stopping short and leave children behind.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        children.stop()


if __name__ == "__main__":
    raise SystemExit(main())
