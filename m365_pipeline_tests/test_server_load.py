"""m365-serve under abuse: idle and slow clients never hold up others, and load causes no errors.

A threaded stdlib server with TLS on the listening socket lets one client that connects and
never handshakes block everyone; these tests hold hundreds of such connections open (with and
without TLS) and require a normal client to keep getting every answer within a second.
"""

from __future__ import annotations

import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from contextlib import ExitStack, closing

import pytest
import requests

from .helpers import make_certificate

pytestmark = pytest.mark.load

IDLE_CONNECTIONS = 200
PROBES = 20


def _probe(base_url: str, verify: object) -> list[float]:
    """A normal client: fresh connections, each answer timed; every one must succeed."""
    durations = []
    for index in range(PROBES):
        path = "/api/m365/summary" if index % 2 else "/api/m365/export?format=csv"
        started = time.monotonic()
        response = requests.get(base_url + path, timeout=5, verify=verify)
        durations.append(time.monotonic() - started)
        assert response.status_code == 200
    return durations


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_200_idle_connections_do_not_delay_a_normal_client(published, start_server, tmp_path, scheme):
    _raise_fd_limit()
    extra, verify = (), True
    if scheme == "https":
        cert, key = make_certificate(tmp_path)
        extra, verify = ("--certfile", str(cert), "--keyfile", str(key)), str(cert)
    served = start_server(published.data_dir, *extra, scheme=scheme)
    with ExitStack() as stack:
        idle = [stack.enter_context(closing(socket.create_connection(("127.0.0.1", served.port), timeout=5)))
                for _ in range(IDLE_CONNECTIONS)]  # connected, never a byte (no TLS handshake either)
        durations = _probe(served.base_url, verify)
        assert len(idle) == IDLE_CONNECTIONS
    assert max(durations) < 1.0, f"slowest answer {max(durations):.2f} s"


def test_slow_clients_do_not_delay_a_normal_client(published, start_server):
    served = start_server(published.data_dir)
    stop = threading.Event()

    def slowloris() -> None:  # a request sent one byte at a time
        with closing(socket.create_connection(("127.0.0.1", served.port), timeout=5)) as sock:
            for byte in b"GET /api/m365/summary HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.02)

    def never_reads() -> None:  # asks for the export, then never reads the answer
        with closing(socket.create_connection(("127.0.0.1", served.port), timeout=5)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(20):
                sock.sendall(b"GET /api/m365/export?format=json HTTP/1.1\r\nHost: x\r\n\r\n")
            stop.wait(10)

    threads = [threading.Thread(target=slowloris) for _ in range(30)]
    threads += [threading.Thread(target=never_reads) for _ in range(30)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        durations = _probe(served.base_url, True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert max(durations) < 1.0, f"slowest answer {max(durations):.2f} s"


LUA_ROTATE = """
local paths = {"/api/m365/summary", "/api/m365/users?org=%s", "/api/m365/export?format=csv",
               "/api/m365/export?format=json&sort=display_name", "/"}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


def test_1000_concurrent_connections_for_30_seconds_get_no_errors(published, start_server, tmp_path):
    """wrk (a standard load tool) holds 1,000 connections for 30 s; every answer must be a 200."""
    wrk = shutil.which("wrk")
    assert wrk, "wrk is installed by `make test` (scripts/system-packages.sh)"
    _raise_fd_limit()
    served = start_server(published.data_dir, "--no-access-log")
    org = published.truth["organizations"][0]["organization_name"]
    script = tmp_path / "rotate.lua"
    script.write_text(LUA_ROTATE % requests.utils.quote(org, safe=""))
    result = subprocess.run(
        [wrk, "-t2", "-c1000", "-d30s", "--timeout", "5s", "-s", str(script), served.base_url],
        capture_output=True, check=False, text=True, timeout=90, preexec_fn=_raise_fd_limit,
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout
    total = int(re.search(r"(\d+) requests in", report).group(1))
    assert total > 10_000, report
    assert "Socket errors" not in report, report  # connect, read, write or timeout errors
    assert "Non-2xx or 3xx responses" not in report, report
    assert served.process.poll() is None and requests.get(served.base_url + "/api/m365/summary",
                                                          timeout=5).status_code == 200
