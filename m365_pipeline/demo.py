"""``make demo`` and ``make dev``: the whole product on this machine with no vendor account.

demo: run the ``nightly_refresh`` job for each of the past two weeks' nights (at its date, under
      libfaketime, against the simulator as it was that night), then once tonight, and serve the
      API and dashboard.
dev:  start the simulator and ``dagster dev`` (UI on :3000) against the same data directory.
Ctrl-C stops every process this started.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from m365_pipeline.processes import free_port, port_is_free, read_simulator_banner, wait_for_port

BIN = Path(sys.executable).parent
DAGSTER_YAML = """\
# Project-local Dagster instance for `make demo` / `make dev` (DAGSTER_HOME was unset).
telemetry:
  enabled: false
run_retries:
  enabled: true
# One run at a time, as in deploy/dagster.yaml: a second one waits in the queue.
concurrency:
  runs:
    tag_concurrency_limits:
      - key: dagster/code_location
        value: m365_pipeline
        limit: 1
"""


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def free_port_near(preferred: int) -> int:
    return preferred if port_is_free(preferred) else free_port()


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


def start_simulator(children: Children, env: dict[str, str], *options: str) -> dict[str, str]:
    port = free_port_near(int(env.get("M365_DEMO_SIMULATOR_PORT", "8765")))
    proc = children.start("simulator", [str(BIN / "m365-simulate"), "--port", str(port), *options], env,
                          stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    banner = read_simulator_banner(proc.stdout)
    if banner is None or proc.poll() is not None or "SAAS_API_BASE_URL" not in banner.env:
        raise SystemExit("[demo] the simulator did not start; see its message above")
    say(f"simulator: {banner.summary}")
    return banner.env


def run_pipeline_once(env: dict[str, str]) -> None:
    """Run the nightly job in this process, recorded in the Dagster instance `make dev` shows."""
    os.environ.update(env)
    from dagster import DagsterInstance

    from m365_pipeline.definitions import defs

    job = defs().resolve_job_def("nightly_refresh")
    started = time.monotonic()
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    if not result.success:
        raise SystemExit("[demo] the pipeline run failed; open `make dev` to see why (the run is in its history)")
    say(f"pipeline run {result.run_id[:8]} succeeded in {time.monotonic() - started:.1f} s")


# -- past nights ----------------------------------------------------------------------------------
PAST_NIGHTS = 14  # two weeks of history before tonight (docs/RULES.md, rule 11)
_NIGHT_CHILD = """
import json, os, sys
from m365_pipeline.demo import run_pipeline_once
from m365_pipeline.simulator import Simulator, SimulatorConfig
with Simulator(SimulatorConfig(night=int(sys.argv[1])), host="127.0.0.1", port=0) as sim:
    run_pipeline_once({**json.loads(os.environ["M365_DEMO_ENV"]), **sim.env})
"""


def run_past_nights(env: dict[str, str]) -> int:
    """Run the real job once per past night, oldest first, each in a child process whose clock
    (libfaketime) says 23:00 UTC on that night's date, against the simulator's data of that night.
    Returns the simulator night tonight is (0 when the history cannot be made)."""
    nights = int(env.get("M365_DEMO_PAST_NIGHTS", PAST_NIGHTS))
    if nights and shutil.which("faketime") is None:
        say("faketime is not installed (sh scripts/system-packages.sh faketime): serving tonight only, no history")
        return 0
    today = dt.datetime.now(dt.UTC).date()
    for night in range(nights):
        day = today - dt.timedelta(days=nights - night)
        say(f"night {night + 1} of {nights + 1}: {day} (the pipeline at 23:00 UTC that day)")
        child_env = {**env, "TZ": "UTC", "FAKETIME_DONT_FAKE_MONOTONIC": "1", "M365_DEMO_ENV": json.dumps(env)}
        done = subprocess.run(["faketime", "-f", f"@{day} 23:00:00", sys.executable, "-c", _NIGHT_CHILD,
                               str(night)], env=child_env)
        if done.returncode:
            raise SystemExit(f"[demo] the run for {day} failed; see its message above")
    say(f"night {nights + 1} of {nights + 1}: tonight")
    return nights


def demo(root: Path, env: dict[str, str], children: Children) -> None:
    port = int(env.get("M365_DEMO_PORT", "5400"))
    if not port_is_free(port):
        raise SystemExit(f"[demo] port {port} is in use (another `make demo`?); stop it or set M365_DEMO_PORT")
    tonight = run_past_nights(env)
    env.update(start_simulator(children, env, "--night", str(tonight)))
    run_pipeline_once(env)
    data_dir = Path(env["M365_DATA_DIR"])
    server = children.start("m365-serve", [str(BIN / "m365-serve"), "--port", str(port), "--data-dir",
                                           str(data_dir), "--no-access-log"], env)
    wait_until_listening(port, server)
    base = f"http://127.0.0.1:{port}"
    print(f"""
  M365 Usage Dashboard   {base}/
  API                    {base}/api/m365/summary
                         {base}/api/m365/history   {base}/api/m365/changes?since=<YYYY-MM-DD>
                         {base}/api/m365/users?org=<name>
                         {base}/api/m365/export?format=csv
  DuckDB (analysts)      duckdb -readonly {data_dir / 'analytics.duckdb'}
  DuckDB (pipeline)      {data_dir / 'm365.duckdb'}
  Dagster UI             make dev   (then http://127.0.0.1:3000)
  Vendor simulator       {env['SAAS_API_BASE_URL']} and {env['BACKUP_API_BASE_URL']}

  Ctrl-C stops everything this started.
""", flush=True)


def dev(root: Path, env: dict[str, str], children: Children) -> None:
    env.update(start_simulator(children, env))
    port = env.get("M365_DAGSTER_PORT", "3000")
    say(f"Dagster UI on http://127.0.0.1:{port} (workspace.yaml); Ctrl-C stops it and the simulator")
    children.start("dagster dev", [str(BIN / "dagster"), "dev", "-w", str(root / "workspace.yaml"),
                                   "-h", "127.0.0.1", "-p", port], env, cwd=root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m365_pipeline.demo", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=["demo", "dev"], default="demo")
    args = parser.parse_args(argv)
    root = Path.cwd()
    env = prepare_environment(root)
    children = Children()

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        (demo if args.mode == "demo" else dev)(root, env, children)
        while all(proc.poll() is None for _, proc in children.processes):
            time.sleep(0.5)
        failed = [name for name, proc in children.processes if proc.poll() is not None]
        say(f"{', '.join(failed)} exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        children.stop()


if __name__ == "__main__":
    raise SystemExit(main())
