"""The pull against vendors with latency and rate limits: today's client (aiohttp) against the one before it.

    .venv/bin/python bench/pace.py [--quick]    # prints the markdown table for bench/RESULTS.md

Per scenario one simulator subprocess (``m365-simulate --latency-ms --jitter-ms --rate-limit``), then
bench/client_probe.py over the same users once per client, each in its own process with its resource
defaults: the client before issue 24 (``BEFORE_REF``: our own keep-alive transport on httptools, paging code
waiting on it through greenlets), extracted with ``git archive`` and put first on PYTHONPATH, and this tree's
client (aiohttp, async pagers on one event loop, the adaptive limit with its token-bucket marks).
The simulator's token bucket has its default burst (``--rate-burst 20``) and answers 429 with
``Retry-After: 1``. The 200/s scenario pulls 12,000 users (a minute at that pace), so the figure is the pace a
night settles at, not the first second's slow start.
Figures are the client's own: per-user calls/s (every call, 429s included, over the wall time), the share
answered 429, its CPU seconds per call (getrusage, so other load on the machine inflates it less than wall
time), and whether every subscription landed (the count equals the one from an unthrottled pass over the
same users).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import BENCH, BIN, ROOT, Children, say
from pipeline import SEED

from m365_pipeline.processes import read_simulator_banner

BEFORE_REF = "4032c29^"  # main before issue 24: our own transport and the greenlet bridge
# (label in the table, commit or None for this tree)
CLIENTS: list[tuple[str, str | None]] = [("before", BEFORE_REF), ("after", None)]
ORGS = 600  # ~9,400 source S users, as in issue 15's measurements


# (name, simulator flags, users)
SCENARIOS: list[tuple[str, list[str], int]] = [
    ("zero latency (CPU per call)", [], 5000),
    ("100 ms ± 20 ms, no limit", ["--latency-ms", "100", "--jitter-ms", "20"], 9000),
    ("100 ms ± 20 ms, 200 requests/s per token, burst 20", ["--latency-ms", "100", "--jitter-ms", "20",
                                                            "--rate-limit", "200"], 12000),
    ("100 ms ± 20 ms, 20 requests/s per token", ["--latency-ms", "100", "--jitter-ms", "20",
                                                 "--rate-limit", "20"], 600),
]


def extract(work: Path, ref: str) -> Path:
    target = work / ref
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "m365_pipeline"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def probe(children: Children, flags: list[str], users: int, pythonpath: Path) -> dict[str, Any]:
    args = [str(BIN / "m365-simulate"), "--port", "0", "--orgs", str(ORGS), "--seed", str(SEED), *flags]
    sim = children.start("m365-simulate", args, stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        banner = read_simulator_banner(sim.stdout)
        if banner is None:
            raise RuntimeError("the simulator did not start")
        env = {**os.environ, **banner.env, "PYTHONPATH": str(pythonpath)}
        out = subprocess.run([sys.executable, str(BENCH / "client_probe.py"), str(users), "default"], env=env,
                             capture_output=True, text=True, timeout=900)
        if out.returncode:
            raise RuntimeError(f"client_probe.py failed ({pythonpath}):\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        children.stop(sim)


def bench_pace(children: Children, work: Path, quick: bool = False) -> list[dict[str, Any]]:
    paths = {label: extract(work, ref) if ref else ROOT for label, ref in CLIENTS}
    rows = []
    expected: dict[int, int] = {}
    for name, flags, users in SCENARIOS[:2] if quick else SCENARIOS:
        row: dict[str, Any] = {"scenario": name}
        for label, _ in CLIENTS:
            result = probe(children, flags, users, paths[label])
            if users not in expected:
                expected[users] = probe(children, [], users, ROOT)["subscriptions"] if flags else \
                    result["subscriptions"]
            result["complete"] = result["subscriptions"] == expected[users]
            row[label] = result
            say(f"pace: {name}, {label}: {result['calls_per_s']:,.0f} calls/s, "
                f"{result['client_cpu_ms_per_call']:.2f} ms CPU/call, {result['retries']} retries, "
                f"peak {result.get('concurrency_peak', result['concurrency'])} in flight")
        rows.append(row)
    return rows


def pace_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| vendor | client | users | calls/s | answered 429 | in flight (peak → end) | CPU ms/call | "
             "every row |", "|---|---|---:|---:|---:|---|---:|---|"]
    for row in rows:
        for label, _ in CLIENTS:
            r = row[label]
            flight = (f"{r['concurrency_peak']} → {r['concurrency_final']} (ceiling {r['concurrency']})"
                      if "concurrency_peak" in r else f"{r['concurrency']} (fixed)")
            lines.append(f"| {row['scenario']} | {label} | {r['users']:,} | {r['calls_per_s']:,.0f} | "
                         f"{100 * r['retries'] / r['calls']:.1f} % | {flight} | "
                         f"{r['client_cpu_ms_per_call']:.2f} | {'yes' if r['complete'] else '**no**'} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/pace.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first two scenarios only")
    args = parser.parse_args()
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="m365-pace-") as work:
            rows = bench_pace(children, Path(work), args.quick)
    finally:
        children.stop_all()
    print("\n".join(pace_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
