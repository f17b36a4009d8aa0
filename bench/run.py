"""`make bench`: the real product against `m365-simulate`, in one process tree and bounded in time.

    .venv/bin/python bench/run.py            # demo, 100k and 1M users, then the server; writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick    # demo scale only (< 2 min); writes bench/RESULTS-quick.md

Per scale: one simulator subprocess (`m365-simulate --port 0 ...`), then N runs of the `nightly_refresh`
job, each in a child process (bench/job.py) with a fresh M365_DATA_DIR and an ephemeral Dagster instance.
Phases come from Dagster's own step events (sum of the step wall times, steps run one after another):
pull = raw.* assets; transform = core.* and marts.* assets and their checks; export = export.dashboard_api
(the API files, their gzip twins and the atomic publish of the version); publish = export.analytics_db
(the analysts' copy). Reported values are medians over the runs.

Then the simulator alone (wrk over distinct users, and the project's client), and the server: m365-serve
against nginx serving the same files and a stdlib ThreadingHTTPServer baseline, with wrk at 50 connections.

Every child has a timeout and its own process group; all are stopped at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent
SEED = 42
REPEATS = 3  # wrk runs per server and endpoint; the median one is reported


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
TARGETS = {"demo_job_s": 10.0, "100k_total_s": 180.0, "1m_rss_bytes": 2 << 30, "1m_tep_s": 60.0,
           "server_ratio": 0.4, "server_p99_ms": 10.0}


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- processes -------------------------------------------------------------------------------------

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc (clock ticks)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_peak(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    env: dict[str, str] = {}
    watchdog = threading.Timer(60, proc.kill)  # a simulator that never prints its variables is stopped
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                env[name] = shlex.split(value)[0] if value else ""
            elif line.startswith("#"):
                users = int(re.search(r"([0-9]+) source S users", line)[1])
                return Simulator(proc, env, users)
    finally:
        watchdog.cancel()
    raise RuntimeError("the simulator did not start within 60 s")


# -- one nightly run -------------------------------------------------------------------------------

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
    if step_key.startswith("export__dashboard_api"):
        return "export"
    if step_key.startswith("export__analytics_db"):
        return "publish"
    raise ValueError(f"unknown step {step_key}")


def run_job(children: Children, sim: Simulator, scale: Scale, work: Path, index: int) -> Run:
    data_dir = work / f"{scale.name}-run{index}" / "data"
    data_dir.mkdir(parents=True)
    env = {**os.environ, **sim.env, "M365_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(data_dir.parent),
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


# -- the simulator alone ---------------------------------------------------------------------------

def wrk(url: str, *, connections: int, duration_s: int, threads: int = 1, script: Path | None = None,
        headers: list[str] | None = None) -> dict[str, Any]:
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


def probe_simulator(sim: Simulator, work: Path, quick: bool) -> dict[str, Any]:
    """Subscriptions calls/s of the simulator alone: wrk over distinct users, and the project's client."""
    results: dict[str, Any] = {}
    base = sim.env["SAAS_API_BASE_URL"]
    host = base.split("/api/")[0]
    prefix = "/api/" + base.split("/api/", 1)[1]
    conn = http.client.HTTPConnection(host.removeprefix("http://"), timeout=30)
    ids: list[str] = []
    for page in range(1, 4 if quick else 13):  # more users than the simulator's 4096-record cache
        conn.request("GET", f"{prefix}/users?page_size=1000&page_number={page}",
                     headers={"Authorization": f"Bearer {sim.env['SAAS_API_TOKEN']}"})
        items = json.loads(conn.getresponse().read())["items"]
        ids += [item["id"] for item in items]
        if not items:
            break
    conn.close()
    script = work / "subscriptions.lua"
    paths = ",".join(json.dumps(f"{prefix}/users/{i}/subscriptions?page_size=1000&page_number=1") for i in ids)
    script.write_text(f"paths = {{{paths}}}\ncounter = 0\n"
                      'wrk.headers["Authorization"] = "Bearer ' + sim.env["SAAS_API_TOKEN"] + '"\n'
                      "request = function()\n  counter = counter + 1\n"
                      '  return wrk.format("GET", paths[(counter % #paths) + 1])\nend\n')
    if shutil.which("wrk"):
        results["wrk"] = wrk(host, connections=16, duration_s=4 if quick else 10, script=script)
        results["wrk"]["distinct_users"] = len(ids)
    users = min(len(ids), 2000 if quick else 12000)
    results["client"] = []
    for concurrency in ((16,) if quick else (4, 16, 32)):
        out = subprocess.run([sys.executable, str(BENCH / "client_probe.py"), str(users), str(concurrency)],
                             env={**os.environ, **sim.env}, capture_output=True, text=True, timeout=300, check=True)
        results["client"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# -- the server ------------------------------------------------------------------------------------

NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    etag on;
    gzip_static on;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /api/m365/summary {{ try_files /summary.json =404; }}
        location = /api/m365/users {{ try_files /{users} =404; }}
    }}
}}
"""


@dataclass
class Published:
    version_dir: Path
    manifest: dict[str, Any]
    org: str
    users_file: str

    @property
    def summary_size(self) -> int:
        return self.manifest["files"]["summary"]["size"]

    @property
    def users_size(self) -> int:
        return self.manifest["files"][self.manifest["organizations"][self.org]]["size"]


def published_version(data_dir: Path) -> Published:
    version_dir = (data_dir / "export" / "current").resolve()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    sized = sorted((manifest["files"][key]["size"], name) for name, key in manifest["organizations"].items())
    _, org = sized[len(sized) // 2]  # the median organization by users-file size
    return Published(version_dir, manifest, org, manifest["files"][manifest["organizations"][org]]["path"])


def bench_server(children: Children, published: Published, work: Path, duration_s: int,
                 encodings: tuple[str, ...]) -> dict[str, Any]:
    """wrk -c50 against m365-serve, nginx and the stdlib baseline on the same files: {encoding: {server: ...}}.

    ``identity``: wrk's default (no Accept-Encoding), the uncompressed files. ``gzip``: Accept-Encoding: gzip,
    as every browser sends; m365-serve and nginx (gzip_static) then send the same .gz twins.
    """
    endpoints = {"summary": "/api/m365/summary", "users": "/api/m365/users?" + urlencode({"org": published.org})}
    servers: dict[str, list[str]] = {}
    servers["m365-serve"] = [str(BIN / "m365-serve"), "--port", "PORT", "--data-dir",
                             str(published.version_dir.parent.parent.parent), "--no-access-log"]
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    nginx_work = work / "nginx"
    if nginx:
        nginx_work.mkdir(exist_ok=True)
        servers["nginx"] = [nginx, "-c", str(nginx_work / "nginx.conf"), "-p", str(nginx_work)]
    servers["stdlib ThreadingHTTPServer"] = [sys.executable, str(BENCH / "stdlib_server.py"), "PORT",
                                             str(published.version_dir / "summary.json"),
                                             str(published.version_dir / published.users_file)]
    results: dict[str, Any] = {encoding: {} for encoding in encodings}
    for name, args in servers.items():
        port = free_port()
        args = [str(port) if a == "PORT" else a for a in args]
        if name == "nginx":
            (nginx_work / "nginx.conf").write_text(NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "", work=nginx_work, port=port,
                root=published.version_dir, users=published.users_file))
        log = (work / f"{name.split()[0]}.log").open("w")
        proc = children.start(name, args, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            url = f"http://127.0.0.1:{port}"
            for encoding in encodings:
                if encoding == "gzip" and name.startswith("stdlib"):
                    continue  # the baseline serves identity only
                headers = {"Accept-Encoding": "gzip"} if encoding == "gzip" else {}
                results[encoding][name] = {}
                for endpoint, path in endpoints.items():
                    check = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    check.request("GET", path, headers=headers)
                    response = check.getresponse()
                    body = response.read()
                    check.close()
                    entry = published.manifest["files"]["summary" if endpoint == "summary" else
                                                        published.manifest["organizations"][published.org]]
                    expected = entry["gzip_size"] if encoding == "gzip" else entry["size"]
                    if response.status != 200 or len(body) != expected:
                        raise RuntimeError(f"{name} {path} ({encoding}): {response.status}, {len(body)} bytes "
                                           f"(expected {expected})")
                    wrk_headers = [f"{k}: {v}" for k, v in headers.items()]
                    wrk(url + path, connections=50, duration_s=1, headers=wrk_headers)  # warm-up
                    repeats = sorted((wrk(url + path, connections=50, duration_s=duration_s, headers=wrk_headers)
                                      for _ in range(REPEATS)), key=lambda r: r["rps"])
                    results[encoding][name][endpoint] = {**repeats[len(repeats) // 2],
                                                         "all_rps": [r["rps"] for r in repeats], "bytes": expected}
        finally:
            children.stop(proc)
            log.close()
    return results


def check_gzip(children: Children, published: Published) -> list[dict[str, Any]]:
    """The export files as m365-serve sends them with Accept-Encoding: gzip, against the manifest."""
    port = free_port()
    proc = children.start("m365-serve", [str(BIN / "m365-serve"), "--port", str(port), "--data-dir",
                                         str(published.version_dir.parent.parent.parent), "--no-access-log"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_for_port(port, proc)
        for fmt in ("csv", "json"):
            for sort in ("organization_name", "user_principal_name", "display_name"):
                entry = published.manifest["files"][f"export:{fmt}:{sort}"]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                started = time.monotonic()
                conn.request("GET", f"/api/m365/export?format={fmt}&sort={sort}", headers={"Accept-Encoding": "gzip"})
                response = conn.getresponse()
                received = decoded = 0
                magic = b""
                inflate = zlib.decompressobj(wbits=31)  # the body really is gzip of the exact file
                while chunk := response.read(1 << 20):
                    magic = magic or chunk[:2]
                    received += len(chunk)
                    decoded += len(inflate.decompress(chunk))
                decoded += len(inflate.flush())
                conn.close()
                rows.append({
                    "file": f"{sort}.{fmt}", "size": entry["size"], "gzip_size": entry.get("gzip_size"),
                    "content_encoding": response.getheader("content-encoding"),
                    "framing": "Content-Length" if response.getheader("content-length") else
                               response.getheader("transfer-encoding") or "close", "received": received,
                    "decoded_ok": magic == b"\x1f\x8b" and decoded == entry["size"],
                    "seconds": time.monotonic() - started,
                })
    finally:
        children.stop(proc)
    return rows


# -- the report ------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for package in ("dagster", "duckdb", "granian", "urllib3", "pandas"):
        out[package] = version(package)
    for tool, args in (("nginx", ["-v"]), ("wrk", ["-v"])):
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
        if path:
            text = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
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


def targets(results: dict[str, ScaleResult], server: dict[str, Any]) -> list[str]:
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
                add("4", f"{scale_name} data, {encoding}, `{endpoint}` ({kb(ours['bytes'])}): ≥ 0.4× nginx, "
                    "p99 ≤ 10 ms at 50 connections", measured, ok)
    return lines


def server_table(server: dict[str, Any], published: dict[str, Published]) -> list[str]:
    lines = []
    for scale_name, per_encoding in server.items():
        pub = published[scale_name]
        for encoding, per_server in per_encoding.items():
            sizes = {e: per_server["m365-serve"][e]["bytes"] for e in ("summary", "users")}
            lines += [f"**{scale_name} data, {encoding}** — summary {kb(sizes['summary'])}, users file of the "
                      f"median organization ({pub.manifest['files'][pub.manifest['organizations'][pub.org]]['size']:,}"
                      f" bytes uncompressed) {kb(sizes['users'])}:", "",
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


def write_report(path: Path, args: argparse.Namespace, results: dict[str, ScaleResult], server: dict[str, Any],
                 published: dict[str, Published], gzip_rows: dict[str, list[dict[str, Any]]], started: float) -> None:
    v = versions()
    lines = [
        "# Benchmark results", "",
        f"Written by `{'make bench-quick' if args.quick else 'make bench'}` (`bench/run.py`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {(time.monotonic() - started) / 60:.1f} min. "
        "Re-run it to refresh the numbers; the notes at the end are `bench/NOTES.md`.", "",
        f"- **Machine**: {machine()}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Simulator**: `m365-simulate --seed {SEED}` in its own process; each run a fresh data directory "
        "and an ephemeral Dagster instance; the job runs in a child process (`bench/job.py`).",
        "- **Phases** (sum of Dagster step wall times): pull = `raw.*`; transform = `core.*`, `marts.*` and "
        "their checks; export = `export.dashboard_api` (API files, gzip twins, atomic publish); publish = "
        "`export.analytics_db` (the analysts' copy). Dagster overhead = job wall − sum of steps.",
        "", "## Pipeline, per scale (medians)", "", *scale_table(list(results.values())), "",
    ]
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
                  f"wrk 4.1, 1 thread, 50 connections, {REPEATS} runs of {args.server_seconds} s per cell after a "
                  "1 s warm-up (the median run is shown, the range of all in brackets). *identity*: wrk's default, no "
                  "Accept-Encoding, the uncompressed files; *gzip*: `Accept-Encoding: gzip` as browsers send, "
                  "m365-serve and nginx (`gzip_static on`) send the same `.gz` twins. Each server is one worker "
                  "process on the same 2 cores as wrk, all in one session (see `Children` in `bench/run.py` on "
                  "autogroup scheduling); nginx serves the same published files (`sendfile`, `access_log off`); the "
                  "stdlib baseline (`bench/stdlib_server.py`) serves the same bytes from memory.", "",
                  *server_table(server, published)]
    for scale_name, rows in gzip_rows.items():
        lines += [f"## Exports served gzip-compressed ({scale_name} data)", "",
                  "`GET /api/m365/export?format=…&sort=…` with `Accept-Encoding: gzip` against m365-serve; "
                  "the `.gz` twins are made once at publish time (`publishing.py`).", "",
                  "| file | size | gzip twin | ratio | Content-Encoding | framing | bytes sent = twin, inflate to the file "
                  "| time |",
                  "|---|---:|---:|---:|---|---|---|---:|"]
        for row in rows:
            ok = row["received"] == row["gzip_size"] and row["decoded_ok"]
            lines.append(f"| {row['file']} | {kb(row['size'])} | {kb(row['gzip_size'] or 0)} | "
                         f"{(row['gzip_size'] or 0) / row['size']:.2f} | {row['content_encoding']} | {row['framing']} | "
                         f"{'yes' if ok else 'NO'} ({kb(row['received'])}) | {row['seconds']:.2f} s |")
        lines.append("")
    lines += ["## Targets", "", *targets(results, server), ""]
    notes = BENCH / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    path.write_text("\n".join(lines))


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="demo scale only (under two minutes)")
    parser.add_argument("--scales", default=None, help="comma-separated subset of: " + ", ".join(SCALES))
    parser.add_argument("--runs", type=int, default=None, help="runs per scale (default: 3, 3, 1)")
    parser.add_argument("--server-seconds", type=int, default=None,
                        help=f"duration of each of the {REPEATS} wrk runs per cell (default 5, quick 2)")
    parser.add_argument("--no-server", action="store_true", help="skip the server comparison")
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
    try:
        say(f"machine: {machine()}; work directory {work}")
        for name in names:
            base = SCALES[name]
            scale = Scale(base.name, base.orgs, base.users_per_org, args.runs or base.runs, base.timeout_s)
            sim = start_simulator(children, scale)
            result = results[name] = ScaleResult(scale, sim.users)
            say(f"{name}: simulator serves {scale.orgs:,} organizations, {sim.users:,} source S users")
            if name != "1m":  # the same simulator code at any scale; 1M's wrk would only repeat 100k's
                result.probe = probe_simulator(sim, work, args.quick)
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
        largest = names[-1]
        gzip_rows[largest] = check_gzip(children, published[largest])
        write_report(output, args, results, server, published, gzip_rows, started)
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
