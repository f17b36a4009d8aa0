"""Connections that send nothing are closed (rule 18), and no client holds more than its share.

granian (through hyper) times a request head on a new connection only from its first byte: a connection
that sends nothing is held for ever, and about 2,050 of them take every slot of the accept loop (issue 25).
granian has no setting for it, so each worker watches the TCP connections it holds: a thread lists the
worker's own file descriptors once a second, reads each connection's ``TCP_INFO`` from the kernel and
shuts down

- a connection on which no request head has completed (the app has not seen one) after ``head_timeout``,
  whether it sent nothing, part of a head, or only a TLS handshake;
- a kept-alive connection idle for ``keep_alive_timeout``: no request started and no byte sent or received
  (``tcpi_last_data_recv`` / ``tcpi_last_data_sent``) for that long. hyper closes these itself, its
  ``header_read_timeout`` (set to the keep-alive timeout) running from the end of the last answer, so this
  is the backstop;
- past ``max_per_client`` connections from one address, the excess: first those that have not completed a
  request head (newest first), then the longest idle. (nginx's ``limit_conn`` counts requests being
  processed; the risk here is connections held open, so those are what is counted.)

A head on a kept-alive connection must so be complete within the keep-alive timeout of the previous
answer. ``shutdown`` on a duplicate of the descriptor acts on the connection granian holds, which then
sees the end of the stream and closes its descriptor.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

HEAD_TIMEOUT_S = 30.0
KEEP_ALIVE_TIMEOUT_S = 75.0
MAX_CONNECTIONS_PER_CLIENT = 256
SCAN_INTERVAL_S = 1.0
WATCH_VARIABLE = "M365_SERVE_CONNECTION_WATCH"  # set by m365-serve for its workers (server/cli.py)
# struct tcp_info (linux/tcp.h): tcpi_state is byte 0; tcpi_last_data_sent at 44, tcpi_last_data_recv at 52
# (milliseconds ago); tcpi_bytes_received (u64) at 128, since Linux 4.1.
_TCP_INFO = struct.Struct("=B43xI4xI")
_TCP_ESTABLISHED = 1
LOG = logging.getLogger("m365_serve.connections")


@dataclass
class Connection:
    fd: int
    inode: int
    peer: tuple[str, int]
    idle_s: float  # since the last byte either way
    seen_request: bool
    age_s: float  # since this watcher first saw it


def _peer_key(client: str) -> tuple[str, int] | None:
    """granian's ``scope.client`` ("1.2.3.4:5678" or "[::1]:5678") as getpeername's (host, port)."""
    host, _, port = client.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


class ConnectionWatch:
    """One per worker process; ``request_started`` is called by the app for every request."""

    def __init__(self, port: int, head_timeout: float = HEAD_TIMEOUT_S,
                 keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT_S,
                 max_per_client: int = MAX_CONNECTIONS_PER_CLIENT, interval: float = SCAN_INTERVAL_S):
        self.port, self.head_timeout, self.keep_alive_timeout = port, head_timeout, keep_alive_timeout
        self.max_per_client, self.interval = max_per_client, interval
        self._started: dict[str, float] = {}  # granian's client string -> when its last request started
        self._requests: dict[tuple[str, int], float] = {}  # the same by getpeername's (host, port), per scan
        self._first_seen: dict[int, float] = {}  # socket inode -> when first listed
        self._stop = threading.Event()

    def request_started(self, client: str) -> None:
        self._started[client] = time.monotonic()  # parsed by the watch thread, not on every request

    def start(self) -> None:
        if not (hasattr(socket, "TCP_INFO") and os.path.isdir("/proc/self/fd")):  # Linux only
            LOG.warning("m365-serve: connections that send nothing are not closed on this system (the watch "
                        "reads Linux's /proc and TCP_INFO); put a reverse proxy in front")
            return
        threading.Thread(target=self._run, name="connection-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # never let the watcher die quietly: log and go on
                LOG.exception("connection watch failed; retrying in %.0f s", self.interval)

    def scan(self) -> list[Connection]:
        """Close what the rules say, once; returns the connections closed (for tests and the log)."""
        now = time.monotonic()
        for client, started in list(self._started.items()):
            if (key := _peer_key(client)) is not None:
                self._requests[key] = max(started, self._requests.get(key, started))
        connections = self._connections(now)
        closing: dict[int, Connection] = {}
        by_peer: dict[str, list[Connection]] = defaultdict(list)
        for conn in connections:
            by_peer[conn.peer[0]].append(conn)
            if not conn.seen_request and conn.age_s >= self.head_timeout:
                closing[conn.inode] = conn
            elif conn.seen_request and conn.idle_s >= self.keep_alive_timeout and \
                    now - self._requests.get(conn.peer, now) >= self.keep_alive_timeout:
                closing[conn.inode] = conn
        if self.max_per_client:
            for conns in by_peer.values():
                excess = len(conns) - self.max_per_client
                if excess > 0:
                    order = sorted(conns, key=lambda c: (c.seen_request, c.age_s if not c.seen_request else -c.idle_s))
                    for conn in order[:excess]:
                        closing.setdefault(conn.inode, conn)
        for conn in closing.values():
            self._shutdown(conn)
        # Forget the closed and gone; a request started after the listing may be on a connection not listed.
        live = {conn.peer for conn in connections} - {conn.peer for conn in closing.values()}
        for peer in [peer for peer, started in self._requests.items() if peer not in live and started < now]:
            self._requests.pop(peer, None)
        for client in [client for client, started in list(self._started.items()) if started < now]:
            if _peer_key(client) not in self._requests:
                self._started.pop(client, None)
        return list(closing.values())

    def _connections(self, now: float) -> list[Connection]:
        found: list[Connection] = []
        inodes: set[int] = set()
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                info = os.fstat(fd)
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode):
                continue
            conn = self._inspect(fd, info.st_ino, now)
            if conn is not None:
                found.append(conn)
                inodes.add(conn.inode)
        self._first_seen = {inode: self._first_seen[inode] for inode in inodes}
        return found

    def _inspect(self, fd: int, inode: int, now: float) -> Connection | None:
        try:
            sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves granian's descriptor
        except OSError:
            return None
        with sock:
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    return None
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or sock.getsockname()[1] != self.port:
                    return None
                state, last_sent, last_recv = _TCP_INFO.unpack_from(
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size))
                peer = sock.getpeername()[:2]
            except OSError:
                return None
        if state != _TCP_ESTABLISHED:
            return None
        # With no byte received, tcpi_last_data_recv counts from the handshake: the age, to the millisecond.
        age = max(now - self._first_seen.setdefault(inode, now), last_recv / 1000)
        return Connection(fd, inode, peer, min(last_sent, last_recv) / 1000, peer in self._requests, age)

    @staticmethod
    def _shutdown(conn: Connection) -> None:
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            return
        with sock:
            try:
                if os.fstat(sock.fileno()).st_ino == conn.inode:  # still the same connection
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
