"""The report: what `make bench` writes to bench/RESULTS.md (`make bench-quick`: bench/RESULTS-quick.md).

The machine and versions; per scale the medians of the runs (phases, Dagster overhead, job and process wall,
vendor calls and calls/s, peak RSS, CPU of pipeline and simulator); the simulator alone; the server tables
(req/s with the range of the repeats, p50, p99, ratio to nginx); the gzip exports; the targets, each with
what was measured and whether it is met (the nights kept and backup coverage sections carry their own,
bench/nights.py); and bench/NOTES.md at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from harness import BENCH, system_tool
from nights import section as nights_section
from pace import BEFORE_REF, pace_table
from pipeline import PHASES, SEED, ScaleResult
from server import BEFORE, REPEATS, WRK_THREADS, Published

from m365_pipeline.server.app import API_PREFIX

TARGETS = {"demo_job_s": 10.0, "100k_total_s": 180.0, "1m_rss_bytes": 2 << 30, "1m_tep_s": 60.0,
           "server_ratio": 0.5, "server_p99_ms": 10.0,  # issue 26
           # issue 24: the pull at the vendor's pace, on aiohttp
           "1m_job_s": 360.0, "cpu_ms_per_call": 0.40, "no_limit_calls_s": 1500.0, "limited_calls_s": 180.0,
           "limited_429_share": 0.10}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("dagster", "duckdb", "granian", "urllib3"):
        out[package] = version(package)
    for tool, args in (("nginx", ["-v"]), ("wrk", ["-v"])):
        path = system_tool(tool)
        if path:
            text = subprocess.run([path, *args], capture_output=True, text=True, timeout=10, check=False)
            line = (text.stdout + text.stderr).strip().splitlines()[0]
            match = re.search(r"(\d+\.\d+\.\d+)", line)
            out[tool] = match[1] if match else line
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.1f} GiB RAM, Linux {platform.release()}"


def fmt_s(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s" if value < 100 else \
        f"{value:.0f} s ({value / 60:.1f} min)"


def gib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


def kb(value: float) -> str:
    return f"{value / 1000:.1f} KB" if value < 10**6 else f"{value / 10**6:.1f} MB"


def scale_table(results: list[ScaleResult]) -> list[str]:
    names = [f"{r.scale.name}: {r.scale.orgs:,} orgs × {r.scale.users_per_org} ({r.users:,} S users)"
             for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(results)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("runs (median of)", [str(len(r.runs)) for r in results])
    for phase in PHASES:
        row(f"{phase}", [fmt_s(r.median(lambda x, p=phase: x.phases[p])) for r in results])
    row("transform + export + publish", [fmt_s(r.median(lambda x: x.phases["transform"] + x.phases["export"]
                                                         + x.phases["publish"])) for r in results])
    row("Dagster overhead (job − steps)", [fmt_s(r.median(lambda x: x.job_s - x.steps_s)) for r in results])
    row("**job wall (execute_in_process)**", [f"**{fmt_s(r.median(lambda x: x.job_s))}**" for r in results])
    row("process wall (Python start + imports + job)", [fmt_s(r.median(lambda x: x.wall_s)) for r in results])
    row("vendor calls (retries)", [f"{int(r.median(lambda x: x.vendor_calls)):,} "
                                   f"({int(r.median(lambda x: x.vendor_retries))})" for r in results])
    row("vendor calls/s (calls ÷ pull wall)", [f"{r.median(lambda x: x.calls_per_s):,.0f}" for r in results])
    row("**peak RSS, pipeline process** (incl. DuckDB)", [f"**{gib(r.median(lambda x: x.peak_rss))}**"
                                                          for r in results])
    row("CPU: pipeline / simulator", [f"{fmt_s(r.median(lambda x: x.job_cpu_s))} / "
                                      f"{fmt_s(r.median(lambda x: x.sim_cpu_s))}" for r in results])
    row("simulator peak RSS", [gib(r.median(lambda x: x.sim_rss)) for r in results])
    return lines


def targets(results: dict[str, ScaleResult], server: dict[str, Any],
            pace_rows: list[dict[str, Any]] | None = None) -> list[str]:
    lines = ["| # | target | measured | met |", "|---|---|---|---|"]

    def add(number: str, text: str, measured: str, ok: bool | None) -> None:
        lines.append(f"| {number} | {text} | {measured} | {'—' if ok is None else 'yes' if ok else '**NO**'} |")

    demo = results.get("demo")
    if demo:
        value = demo.median(lambda x: x.job_s)
        add("1", "demo: whole `nightly_refresh` job incl. Dagster ≤ 10 s", f"{value:.2f} s (process incl. imports "
            f"{demo.median(lambda x: x.wall_s):.2f} s)", value <= TARGETS["demo_job_s"])
    big = results.get("100k")
    if big:
        value = big.median(lambda x: x.wall_s)
        add("2", "100k users end to end ≤ 3 min", f"{value:.0f} s", value <= TARGETS["100k_total_s"])
    huge = results.get("1m")
    if huge:
        rss = huge.median(lambda x: x.peak_rss)
        tep = huge.median(lambda x: x.phases["transform"] + x.phases["export"] + x.phases["publish"])
        add("3a", "1M users completes, peak RSS ≤ 2 GiB", f"completed, {gib(rss)}", rss <= TARGETS["1m_rss_bytes"])
        add("3b", "1M: transform + export + publish ≤ 60 s", f"{tep:.1f} s", tep <= TARGETS["1m_tep_s"])
        job = huge.median(lambda x: x.job_s)
        add("5a", "1M users at zero latency, end to end (the job) ≤ 6 min", f"{job:.0f} s ({job / 60:.1f} min)",
            job <= TARGETS["1m_job_s"])
    add_pace_targets(add, pace_rows or [])
    for scale_name, per_encoding in server.items():
        for encoding, per_server in per_encoding.items():
            serve, nginx = per_server.get("m365-serve"), per_server.get("nginx")
            if not serve:
                continue
            for endpoint in ("summary", "users"):
                ours = serve[endpoint]
                if nginx:
                    ratio = ours["rps"] / nginx[endpoint]["rps"]
                    ok = ratio >= TARGETS["server_ratio"] and (ours["p99_ms"] or 0) <= TARGETS["server_p99_ms"]
                    measured = f"{ratio:.2f}× nginx ({ours['rps']:,.0f} vs {nginx[endpoint]['rps']:,.0f} req/s), " \
                               f"p99 {ours['p99_ms']:.2f} ms"
                else:
                    ok, measured = None, f"{ours['rps']:,.0f} req/s, p99 {ours['p99_ms']:.2f} ms (no nginx)"
                add("4", f"{scale_name} data, {encoding}, `{endpoint}` ({kb(ours['bytes'])}): ≥ 0.5× nginx, "
                    "p99 ≤ 10 ms at 50 connections", measured, ok)
    return lines


def add_pace_targets(add: Callable[[str, str, str, bool | None], None], rows: list[dict[str, Any]]) -> None:
    """Issue 24's targets from bench/pace.py's rows (in SCENARIOS order; --quick has the first two)."""
    if len(rows) > 0:
        before, after = (rows[0][label]["client_cpu_ms_per_call"] for label in ("before", "after"))
        add("5b", "client CPU per call at zero latency ≤ 0.40 ms (aiohttp; our own transport before)",
            f"{after:.2f} against {before:.2f} ms", after <= TARGETS["cpu_ms_per_call"])
    if len(rows) > 1:
        r = rows[1]["after"]
        add("5c", "100 ms latency, no limit: ≥ 1,500 per-user calls/s", f"{r['calls_per_s']:,.0f} calls/s",
            r["calls_per_s"] >= TARGETS["no_limit_calls_s"] and r["complete"])
    if len(rows) > 2:
        r = rows[2]["after"]
        share = r["retries"] / r["calls"]
        add("5d", "100 ms, 200 requests/s limit, burst 20, Retry-After 1: ≥ 180 calls/s, ≤ 10 % answered 429, "
            "every row",
            f"{r['calls_per_s']:,.0f} calls/s, {100 * share:.1f} % answered 429",
            r["calls_per_s"] >= TARGETS["limited_calls_s"] and share <= TARGETS["limited_429_share"] and r["complete"])
    if len(rows) > 3:
        r = rows[3]["after"]
        add("5e", "100 ms, 20 requests/s limit: completes with every row",
            f"{r['calls_per_s']:,.0f} calls/s, every row {'landed' if r['complete'] else 'NOT landed'}", r["complete"])


def server_table(server: dict[str, Any], published: dict[str, Published]) -> list[str]:
    lines = []
    for scale_name, per_encoding in server.items():
        pub = published[scale_name]
        for encoding, per_server in per_encoding.items():
            sizes = {e: per_server["m365-serve"][e]["bytes"] for e in ("summary", "users")}
            lines += [(f"**{scale_name} data, {encoding}** — summary {kb(sizes['summary'])}, users file of the "
                       f"median organization ({pub.users.size:,} bytes uncompressed) {kb(sizes['users'])}:"), "",
                      "| server | summary req/s | p50 | p99 | vs nginx | users req/s | p50 | p99 | vs nginx |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            nginx = per_server.get("nginx")
            for name, result in per_server.items():
                cells = []
                for endpoint in ("summary", "users"):
                    r = result[endpoint]
                    ratio = f"{r['rps'] / nginx[endpoint]['rps']:.2f}×" if nginx else "—"
                    errors = f" ({r['errors']} non-2xx)" if r["errors"] else ""
                    spread = f" ({min(r['all_rps']) / 1000:.1f}k–{max(r['all_rps']) / 1000:.1f}k)"
                    cells += [f"{r['rps']:,.0f}{spread}{errors}", f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms",
                              ratio]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


PACE_INTRO = (
    "Each row: a fresh `m365-simulate --orgs 600` with the flags in the first column (its token bucket's burst "
    "is 20, its 429s say `Retry-After: 1`); bench/client_probe.py over that many users, each user's "
    "subscriptions, in its own process with the resource's defaults. *before*: the client of commit `"
    + BEFORE_REF + "` (our own keep-alive transport on httptools, paging through greenlets); *after*: this "
    "tree's (aiohttp, async pagers on one event loop, the adaptive limit under its 256 ceiling). calls/s "
    "counts every call, 429s included, over the wall time; CPU is the client's own "
"(getrusage). *every row*: the subscriptions counted equal an unthrottled pass.")


def write_report(path: Path, args: argparse.Namespace, results: dict[str, ScaleResult], server: dict[str, Any],
                 published: dict[str, Published], gzip_rows: dict[str, list[dict[str, Any]]], started: float,
                 pace_rows: list[dict[str, Any]] | None = None, nights: dict[str, Any] | None = None,
                 nights_command: str = "") -> None:
    v = versions()
    lines = [
        "# Benchmark results", "",
        (f"Written by `{'make bench-quick' if args.quick else 'make bench'}` (`bench/run.py`) on "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {(time.monotonic() - started) / 60:.1f} min. "
         "Re-run it to refresh the numbers; the notes at the end are `bench/NOTES.md`."), "",
        f"- **Machine**: {machine()}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        (f"- **Simulator**: `m365-simulate --seed {SEED}` in its own process; each run a fresh data directory "
         "and an ephemeral Dagster instance; the job runs in a child process (`bench/job.py`)."),
        ("- **Phases** (sum of Dagster step wall times): pull = `raw.*`; transform = `core.*`, `marts.*` and "
         "their checks; export = `export.dashboard_api` (API files, gzip twins, atomic publish); publish = "
         "`export.analytics_db` (the analysts' copy). Dagster overhead = job wall − sum of steps."),
        "", "## Pipeline, per scale (medians)", "", *scale_table(list(results.values())), "",
    ]
    if pace_rows:
        lines += ["## The pull at the vendor's pace: latency and rate limits (`bench/pace.py`)", "",
                  PACE_INTRO, "", *pace_table(pace_rows), ""]
    probes = [(name, r.probe) for name, r in results.items() if r.probe]
    if probes:
        lines += ["## The simulator alone (per-user subscriptions endpoint)", ""]
        for name, probe in probes:
            if "wrk" in probe:
                w = probe["wrk"]
                lines.append(f"- {name} simulator, wrk (1 thread, 16 connections) cycling through "
                             f"{w['distinct_users']:,} distinct users: **{w['rps']:,.0f} req/s**, p99 "
                             f"{w['p99_ms']:.1f} ms — the simulator's ceiling with a client that costs nothing.")
            for c in probe["client"]:
                lines.append(f"- {name} simulator, the project's `SaasClient` + `run_concurrently` at concurrency "
                             f"{c['concurrency']} over {c['users']:,} users: **{c['calls_per_s']:,.0f} calls/s**, "
                             f"client CPU {c['client_cpu_ms_per_call']:.2f} ms per call.")
        lines.append("")
    if server:
        lines += ["## Server: m365-serve (granian RSGI) vs nginx vs stdlib", "",
                  (f"wrk 4.1, {WRK_THREADS} threads, 50 connections, {REPEATS} runs of {args.server_seconds} s per "
                   "cell after a 1 s warm-up (the median run is shown, the range of all in brackets). *identity*: "
                   "wrk's default, no Accept-Encoding, the uncompressed files; *gzip*: `Accept-Encoding: gzip` as "
                   "browsers send, m365-serve and nginx (`gzip_static on`) send the same `.gz` twins. Each server is "
                   "one worker process in its own session (its own autogroup, as a service manager starts it) on the "
                   f"same 2 cores as wrk; *{BEFORE}* is m365-serve as it was before issue 26's speed work, run from "
                   "that commit's package; nginx serves the same published files (`sendfile`, `access_log off`); "
                   "the stdlib baseline (`bench/stdlib_server.py`) serves the same bytes from memory."), "",
                  *server_table(server, published)]
    for scale_name, rows in gzip_rows.items():
        lines += [f"## Exports served gzip-compressed ({scale_name} data)", "",
                  (f"`GET {API_PREFIX}export?format=…&sort=…` with `Accept-Encoding: gzip` against m365-serve; "
                   "the `.gz` twins are made once at publish time (`publishing.py`)."), "",
                  ("| file | size | gzip twin | ratio | Content-Encoding | framing | bytes sent = twin, inflate to the "
                   "file | time |"),
                  "|---|---:|---:|---:|---|---|---|---:|"]
        for row in rows:
            ok = row["received"] == row["gzip_size"] and row["decoded_ok"]
            lines.append(f"| {row['file']} | {kb(row['size'])} | {kb(row['gzip_size'] or 0)} | "
                         f"{(row['gzip_size'] or 0) / row['size']:.2f} | {row['content_encoding']} | "
                         f"{row['framing']} | "
                         f"{'yes' if ok else 'NO'} ({kb(row['received'])}) | {row['seconds']:.2f} s |")
        lines.append("")
    if nights:
        lines += [*nights_section(nights, nights_command), ""]
    lines += ["## Targets", "", *targets(results, server, pace_rows), ""]
    notes = BENCH / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    path.write_text("\n".join(lines))


