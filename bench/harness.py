"""The benchmark's process harness: every child bounded in time and stopped on exit, and what is read from outside.

Children start in their own process group (not their own session, see `Children`) and are stopped in reverse
order at the end, on failure and on Ctrl-C. From outside a child the harness reads its CPU seconds (utime +
stime) and peak RSS (VmHWM) from /proc. `wrk` runs the load generator once, under a timeout, and returns
requests/s, p50 and p99 latency and the error counts it reports. Ports and waiting for a listener are the
product's (`m365_pipeline.processes`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


class Children:
    """Every process this harness starts: own process group, stopped in reverse order.

    A process group, not a session: with the kernel's autogroup scheduling (on by default) a new session
    is a new scheduling group, which would cap a multi-threaded server at the CPU share of one group
    while wrk runs in another (m365-serve measured 7k-21k instead of 28k-37k req/s that way).
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(args, process_group=0, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc (clock ticks)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_peak(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process in bytes, from /proc; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_tool(name: str) -> str | None:
    """A system program on PATH, or in /usr/sbin (where Debian puts nginx) when PATH lacks it."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def wrk(url: str, *, connections: int, duration_s: int, threads: int = 1, script: Path | None = None,
        headers: list[str] | None = None) -> dict[str, Any]:
    """One wrk run (bounded by its duration + 60 s): req/s, p50/p99 in ms, non-2xx/3xx count, socket errors."""
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "5s"]
    for header in headers or []:
        args += ["-H", header]
    if script:
        args += ["-s", str(script)]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    result: dict[str, Any] = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1])}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        result[f"p{pct}_ms"] = float(match[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]] if match else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    result["errors"] = (int(errors[1]) if errors else 0)
    result["socket_errors"] = sockets[1].strip() if sockets else ""
    return result
