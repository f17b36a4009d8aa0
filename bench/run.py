"""`make bench`: the real product against `m365-simulate`, in one process tree and bounded in time.

    .venv/bin/python bench/run.py            # demo, 100k and 1M users, then the server; writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick    # demo scale only (< 2 min); writes bench/RESULTS-quick.md

First the pull against vendors with latency and rate limits, today's client against the one before issue 15
(bench/pace.py). Per scale: one simulator subprocess, a probe of the simulator alone, then N runs of the
`nightly_refresh` job, each in a child process with a fresh data directory; phases come from Dagster's own
step events and the reported values are medians over the runs (bench/pipeline.py, bench/simulator_probe.py,
bench/job.py). Then
the server: m365-serve against nginx serving the same files and a stdlib ThreadingHTTPServer baseline, with
wrk at 50 connections, and the exports served gzip-compressed (bench/server.py). Then 30 nights at 100k
through the real downstream assets (bench/nights.py; its 1M cell with --nights-1m). The report is written by
bench/report.py.

Every child has a timeout and its own process group; all are stopped at the end, on failure and on Ctrl-C
(bench/harness.py).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import BENCH, ROOT, Children, say
from nights import bench_nights
from pace import bench_pace
from pipeline import PHASES, SCALES, Scale, ScaleResult, run_job, start_simulator
from report import gib, machine, targets, write_report
from server import REPEATS, Published, bench_server, check_gzip, published_version
from simulator_probe import probe_simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="demo scale only (under two minutes)")
    parser.add_argument("--scales", default=None, help="comma-separated subset of: " + ", ".join(SCALES))
    parser.add_argument("--runs", type=int, default=None, help="runs per scale (default: 3, 3, 1)")
    parser.add_argument("--server-seconds", type=int, default=None,
                        help=f"duration of each of the {REPEATS} wrk runs per cell (default 5, quick 2)")
    parser.add_argument("--no-server", action="store_true", help="skip the server comparison")
    parser.add_argument("--no-pace", action="store_true", help="skip the latency and rate-limit comparison")
    parser.add_argument("--no-nights", action="store_true",
                        help="skip bench/nights.py (30 nights at 100k: file growth, history and coverage shares)")
    parser.add_argument("--nights-1m", action="store_true",
                        help="also bench/nights.py's 1M cell: two nights, coverage A/B and the history and "
                             "changes endpoints (~15 min more)")
    parser.add_argument("--output", type=Path, default=None, help="report path")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    names = ["demo"] if args.quick else (args.scales.split(",") if args.scales else list(SCALES))
    if unknown := [n for n in names if n not in SCALES]:
        parser.error(f"unknown scale(s): {', '.join(unknown)}")
    args.server_seconds = args.server_seconds or (2 if args.quick else 5)
    output = args.output or BENCH / ("RESULTS-quick.md" if args.quick else "RESULTS.md")

    children = Children()

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="m365-bench-"))
    started = time.monotonic()
    results: dict[str, ScaleResult] = {}
    published: dict[str, Published] = {}
    server: dict[str, Any] = {}
    gzip_rows: dict[str, list[dict[str, Any]]] = {}
    pace_rows: list[dict[str, Any]] = []
    nights: dict[str, Any] | None = None
    nights_command = ""
    try:
        say(f"machine: {machine()}; work directory {work}")
        if not args.no_pace:
            pace_rows = bench_pace(children, work, args.quick)
        for name in names:
            base = SCALES[name]
            scale = Scale(base.name, base.orgs, base.users_per_org, args.runs or base.runs, base.timeout_s)
            sim = start_simulator(children, scale)
            result = results[name] = ScaleResult(scale, sim.users)
            say(f"{name}: simulator serves {scale.orgs:,} organizations, {sim.users:,} source S users")
            if name != "1m":  # the same simulator code at any scale; 1M's wrk would only repeat 100k's
                result.probe = probe_simulator(sim.env, work, args.quick)
                for c in result.probe["client"]:
                    say(f"{name}: simulator alone with the project's client at concurrency {c['concurrency']}: "
                        f"{c['calls_per_s']:,.0f} calls/s")
            for index in range(scale.runs):
                run = run_job(children, sim, scale, work, index)
                result.runs.append(run)
                say(f"{name} run {index + 1}/{scale.runs}: job {run.job_s:.1f} s (process {run.wall_s:.1f} s), "
                    + ", ".join(f"{p} {run.phases[p]:.1f} s" for p in PHASES)
                    + f", {run.calls_per_s:,.0f} calls/s, peak RSS {gib(run.peak_rss)}")
                if index < scale.runs - 1:
                    shutil.rmtree(run.data_dir.parent, ignore_errors=True)
            children.stop(sim.proc)
            published[name] = published_version(result.runs[-1].data_dir)
        if not args.no_server:
            if not shutil.which("wrk"):
                say("wrk is not installed (sh scripts/system-packages.sh nginx wrk): skipping the server comparison")
            else:
                encodings = ("identity",) if args.quick else ("identity", "gzip")
                for name in names:
                    say(f"server comparison on the {name} data")
                    server[name] = bench_server(children, published[name], work, args.server_seconds, encodings)
                    for encoding, per_server in server[name].items():
                        for srv, res in per_server.items():
                            say(f"  {encoding} {srv}: summary {res['summary']['rps']:,.0f} req/s "
                                f"(p99 {res['summary']['p99_ms']} ms), users {res['users']['rps']:,.0f} req/s "
                                f"(p99 {res['users']['p99_ms']} ms)")
        if not args.quick and not args.no_nights:
            cells = ("100k", "1m") if args.nights_1m else ("100k",)
            nights = bench_nights(children, work / "nights", cells=cells)
            nights_command = "make bench" + (" BENCH_ARGS=--nights-1m" if args.nights_1m else "")
        largest = names[-1]
        gzip_rows[largest] = check_gzip(children, published[largest])
        write_report(output, args, results, server, published, gzip_rows, started, pace_rows, nights,
                     nights_command)
        say(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} "
            f"in {(time.monotonic() - started) / 60:.1f} min")
        print("\n".join(targets(results, server)))
        return 0
    except KeyboardInterrupt:
        say("interrupted; stopping every process started")
        return 130
    finally:
        children.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
