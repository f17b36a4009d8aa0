"""The server: m365-serve against nginx and a stdlib baseline on the same published files, and the gzip exports.

`bench_server`: wrk -t2 at 50 connections (1 s warm-up, then REPEATS runs per cell, the median one kept with the
range of all) on the summary and on the users file of the median organization by size, each server one
worker process in its own session on the same cores as wrk: m365-serve, m365-serve as it was before issue 26's
speed work (``SERVER_BEFORE_REF``, extracted with ``git archive``), nginx serving the same version
directory (`sendfile`, `gzip_static`, `access_log off`), and the standard library's ThreadingHTTPServer serving
the same bytes from memory (bench/stdlib_server.py). Before the load every server's answer is checked against
the manifest's size.

`check_gzip`: every export (format × sort) fetched from m365-serve with `Accept-Encoding: gzip`: the bytes
sent must be the `.gz` twin made at publish time and inflate to exactly the file, with the framing used and
the time taken.

The version, its files and sizes are read with the product's manifest reader (`m365_pipeline.publishing`).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from harness import BENCH, BIN, ROOT, Children, system_tool, wrk

from m365_pipeline.api_bodies import FORMATS, SORT_FIELDS, export_file_name
from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.publishing import PublishedFile, PublishedVersion, current_version_dir, export_dir
from m365_pipeline.server.app import API_PREFIX

REPEATS = 3  # wrk runs per server and endpoint; the median one is reported
WRK_THREADS = 2  # wrk -t2 -c50, issue 26's measure

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
        location = {api}summary {{ try_files /{summary} =404; }}
        location = {api}users {{ try_files /{users} =404; }}
    }}
}}
"""


@dataclass
class Published:
    """The version a scale's last run published, and the organization whose users file is benchmarked."""

    data_dir: Path
    version: PublishedVersion
    org: str  # the median organization by users-file size

    @property
    def summary(self) -> PublishedFile:
        return self.version.summary()

    @property
    def users(self) -> PublishedFile:
        users = self.version.users(self.org)
        assert users is not None
        return users

    def relative(self, file: PublishedFile) -> str:
        """A file's path inside the version directory, as nginx's try_files wants it."""
        return file.path.relative_to(self.version.path).as_posix()


def published_version(data_dir: Path) -> Published:
    version_dir = current_version_dir(export_dir(data_dir))
    if version_dir is None:
        raise RuntimeError(f"nothing published under {export_dir(data_dir)}")
    version = PublishedVersion(version_dir)
    sized = sorted((version.files[key].size, name) for name, key in version.organizations.items())
    _, org = sized[len(sized) // 2]  # the median organization by users-file size
    return Published(data_dir, version, org)


SERVER_BEFORE_REF = "5abeba7^"  # main before issue 26 item 8 (each 200 made per request)
BEFORE = f"m365-serve before ({SERVER_BEFORE_REF})"


def extract_package(work: Path, ref: str) -> Path:
    """The package as it was at ``ref``, for PYTHONPATH."""
    target = work / ref.replace("^", "-parent")
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "m365_pipeline"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def serve_args(published: Published, port: int | str) -> list[str]:
    return [str(BIN / "m365-serve"), "--port", str(port), "--data-dir", str(published.data_dir), "--no-access-log"]


def bench_server(children: Children, published: Published, work: Path, duration_s: int,
                 encodings: tuple[str, ...]) -> dict[str, Any]:
    """wrk -c50 against m365-serve, nginx and the stdlib baseline on the same files: {encoding: {server: ...}}.

    ``identity``: wrk's default (no Accept-Encoding), the uncompressed files. ``gzip``: Accept-Encoding: gzip,
    as every browser sends; m365-serve and nginx (gzip_static) then send the same .gz twins.
    """
    endpoints = {"summary": f"{API_PREFIX}summary", "users": f"{API_PREFIX}users?" + urlencode({"org": published.org})}
    files = {"summary": published.summary, "users": published.users}
    servers: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str]] = {}
    servers["m365-serve"] = serve_args(published, "PORT")
    servers[BEFORE] = [sys.executable, "-c", "import sys; from m365_pipeline.server.cli import main; sys.exit(main())",
                       *serve_args(published, "PORT")[1:]]
    envs[BEFORE] = {**os.environ, "PYTHONPATH": str(extract_package(work, SERVER_BEFORE_REF))}
    nginx = system_tool("nginx")
    nginx_work = work / "nginx"
    if nginx:
        nginx_work.mkdir(exist_ok=True)
        servers["nginx"] = [nginx, "-c", str(nginx_work / "nginx.conf"), "-p", str(nginx_work)]
    servers["stdlib ThreadingHTTPServer"] = [sys.executable, str(BENCH / "stdlib_server.py"), "PORT",
                                             str(published.summary.path), str(published.users.path)]
    results: dict[str, Any] = {encoding: {} for encoding in encodings}
    for name, args in servers.items():
        port = free_port()
        args = [str(port) if a == "PORT" else a for a in args]
        if name == "nginx":
            (nginx_work / "nginx.conf").write_text(NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "", work=nginx_work, port=port,
                root=published.version.path, api=API_PREFIX, summary=published.relative(published.summary),
                users=published.relative(published.users)))
        log = (work / f"{name.split()[0]}{'-before' if name == BEFORE else ''}.log").open("w")
        # Each server in its own session (its own autogroup), as a service manager starts it (issue 26, item 8).
        proc = subprocess.Popen(args, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=envs.get(name))
        children.procs.append((name, proc))
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
                    entry = files[endpoint]
                    expected = entry.gzip_size if encoding == "gzip" else entry.size
                    if response.status != 200 or len(body) != expected:
                        raise RuntimeError(f"{name} {path} ({encoding}): {response.status}, {len(body)} bytes "
                                           f"(expected {expected})")
                    wrk_headers = [f"{k}: {v}" for k, v in headers.items()]
                    wrk(url + path, connections=50, duration_s=1, threads=WRK_THREADS, headers=wrk_headers)  # warm-up
                    repeats = sorted((wrk(url + path, connections=50, duration_s=duration_s, threads=WRK_THREADS,
                                          headers=wrk_headers) for _ in range(REPEATS)), key=lambda r: r["rps"])
                    results[encoding][name][endpoint] = {**repeats[len(repeats) // 2],
                                                         "all_rps": [r["rps"] for r in repeats], "bytes": expected}
        finally:
            children.stop(proc)
            log.close()
    return results


def check_gzip(children: Children, published: Published) -> list[dict[str, Any]]:
    """The export files as m365-serve sends them with Accept-Encoding: gzip, against the manifest."""
    port = free_port()
    proc = children.start("m365-serve", serve_args(published, port),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_for_port(port, proc)
        for fmt in sorted(FORMATS):  # csv before json, the report's order
            for sort in SORT_FIELDS:
                entry = published.version.export(sort, fmt)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                started = time.monotonic()
                conn.request("GET", f"{API_PREFIX}export?" + urlencode({"format": fmt, "sort": sort}),
                             headers={"Accept-Encoding": "gzip"})
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
                    "file": Path(export_file_name(sort, fmt)).name, "size": entry.size, "gzip_size": entry.gzip_size,
                    "content_encoding": response.getheader("content-encoding"),
                    "framing": "Content-Length" if response.getheader("content-length") else
                               response.getheader("transfer-encoding") or "close", "received": received,
                    "decoded_ok": magic == b"\x1f\x8b" and decoded == entry.size,
                    "seconds": time.monotonic() - started,
                })
    finally:
        children.stop(proc)
    return rows
