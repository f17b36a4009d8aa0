"""The pipeline at each scale: one simulator, then N runs of the `nightly_refresh` job, each measured.

Per scale: one simulator subprocess (`m365-simulate --port 0 ...`), then N runs of the `nightly_refresh`
job, each in a child process (bench/job.py) with a fresh M365_DATA_DIR and an ephemeral Dagster instance.
Phases come from Dagster's own step events (sum of the step wall times, steps run one after another):
pull = raw.* assets; transform = core.* and marts.* assets and their checks; export = export.dashboard_api
(the API files, their gzip twins and the atomic publish of the version); publish = export.analytics_db
(the analysts' copy). Per run also: the job's wall time and the process's (Python start + imports + job),
vendor calls and retries, the pipeline process's peak RSS (its own getrusage, and /proc polled every 0.2 s)
and CPU, and the simulator's CPU and peak RSS over the run. Reported values are medians over the runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import BENCH, BIN, Children, proc_cpu_s, proc_rss_peak

from m365_pipeline.processes import read_simulator_banner
from m365_pipeline.settings import DATA_DIR_VARIABLE

SEED = 42
SIMULATOR_START_S = 60  # a simulator that never prints its variables is stopped after this


@dataclass(frozen=True)
class Scale:
    name: str
    orgs: int
    users_per_org: int
    runs: int
    timeout_s: float


SCALES = {
    "demo": Scale("demo", 40, 17, 3, 300),
    "100k": Scale("100k", 400, 250, 3, 1200),
    "1m": Scale("1m", 2000, 500, 1, 5400),
}
PHASES = ("pull", "transform", "export", "publish")


@dataclass
class Simulator:
    proc: subprocess.Popen
    env: dict[str, str]
    users: int


def start_simulator(children: Children, scale: Scale) -> Simulator:
    args = [str(BIN / "m365-simulate"), "--port", "0", "--orgs", str(scale.orgs),
            "--users-per-org", str(scale.users_per_org), "--seed", str(SEED)]
    proc = children.start("m365-simulate", args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    watchdog = threading.Timer(SIMULATOR_START_S, proc.kill)
    watchdog.start()
    try:
        banner = read_simulator_banner(proc.stdout)
    finally:
        watchdog.cancel()
    if banner is None:
        raise RuntimeError(f"the simulator did not start within {SIMULATOR_START_S} s")
    return Simulator(proc, banner.env, banner.saas_users)


@dataclass
class Run:
    wall_s: float
    job_s: float
    import_s: float
    phases: dict[str, float]
    steps_s: float
    vendor_calls: int
    vendor_retries: int
    peak_rss: int
    job_cpu_s: float
    sim_cpu_s: float
    sim_rss: int
    data_dir: Path

    @property
    def calls_per_s(self) -> float:
        return self.vendor_calls / self.phases["pull"] if self.phases["pull"] else 0.0


def phase_of(step_key: str) -> str:
    if step_key.startswith("raw__"):
        return "pull"
    if step_key.startswith(("core__", "marts__")):
        return "transform"
    # export.dashboard_api is a multi-asset (it also records the night's marts.*): its step is its op's name
    if step_key.startswith(("export__dashboard_api", "dashboard_api")):
        return "export"
    if step_key.startswith("export__analytics_db"):
        return "publish"
    raise ValueError(f"unknown step {step_key}")


def run_job(children: Children, sim: Simulator, scale: Scale, work: Path, index: int) -> Run:
    data_dir = work / f"{scale.name}-run{index}" / "data"
    data_dir.mkdir(parents=True)
    env = {**os.environ, **sim.env, DATA_DIR_VARIABLE: str(data_dir), "DAGSTER_HOME": str(data_dir.parent),
           "DAGSTER_DISABLE_TELEMETRY": "1"}
    out_path = data_dir.parent / "job.json"
    err_path = data_dir.parent / "job.stderr"
    sim_cpu_before = proc_cpu_s(sim.proc.pid)
    started = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = children.start("nightly_refresh", [sys.executable, str(BENCH / "job.py")], env=env, cwd=data_dir.parent,
                              stdout=out, stderr=err)
        polled_rss = 0
        try:
            while proc.poll() is None:
                if time.monotonic() - started > scale.timeout_s:
                    raise TimeoutError(f"{scale.name} run {index} exceeded {scale.timeout_s:.0f} s")
                polled_rss = max(polled_rss, proc_rss_peak(proc.pid))
                time.sleep(0.2)
        finally:
            children.stop(proc)
    wall = time.monotonic() - started
    sim_cpu = proc_cpu_s(sim.proc.pid) - sim_cpu_before
    text = out_path.read_text().strip().splitlines()
    if proc.returncode != 0 or not text:
        raise RuntimeError(f"{scale.name} run {index} failed (exit {proc.returncode}); see {err_path}:\n"
                           + err_path.read_text()[-3000:])
    report = json.loads(text[-1])
    phases = dict.fromkeys(PHASES, 0.0)
    steps_s = 0.0
    for key, step in report["steps"].items():
        duration = step["end"] - step["start"]
        phases[phase_of(key)] += duration
        steps_s += duration
    vendor = report["vendor"].values()
    return Run(
        wall_s=wall, job_s=report["job_s"], import_s=report["import_s"], phases=phases, steps_s=steps_s,
        vendor_calls=int(sum(v["vendor_calls"] for v in vendor)),
        vendor_retries=int(sum(v["vendor_retries"] for v in vendor)),
        peak_rss=max(report["peak_rss_bytes"], polled_rss), job_cpu_s=report["cpu_s"], sim_cpu_s=sim_cpu,
        sim_rss=proc_rss_peak(sim.proc.pid), data_dir=data_dir,
    )


@dataclass
class ScaleResult:
    scale: Scale
    users: int
    runs: list[Run] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    def median(self, getter) -> float:
        return statistics.median(getter(run) for run in self.runs)
