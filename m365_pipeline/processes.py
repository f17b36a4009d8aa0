"""Process and port helpers shared by the product (`make demo`, staging cleanup, publishing),
the benchmark and the tests: one definition each."""

from __future__ import annotations

import gc
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Young objects between two garbage-collector passes while a process makes or answers vendor calls
# (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once something accepts connections on ``port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = proc.stderr.read() if proc.stderr and not proc.stderr.closed else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}"
                               + (f": {detail}" if detail else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


@dataclass(frozen=True)
class SimulatorBanner:
    """What ``m365-simulate`` prints on start: the variables to export and its one-line summary."""

    env: dict[str, str]
    summary: str

    @property
    def saas_users(self) -> int:
        match = re.search(r"([0-9]+) source S users", self.summary)
        return int(match[1]) if match else 0


def read_simulator_banner(lines: Iterable[str]) -> SimulatorBanner | None:
    """Parse ``export NAME=value`` lines up to the ``#`` summary line; None if the stream ends first."""
    env: dict[str, str] = {}
    for line in lines:
        if line.startswith("export "):
            name, _, value = line[len("export "):].strip().partition("=")
            env[name] = shlex.split(value)[0] if value else ""
        elif line.startswith("#"):
            return SimulatorBanner(env, line.lstrip("# ").strip())
    return None


_collector_lock = threading.Lock()
_collector_users = 0  # pulls (or a simulator) inside young_garbage_collected_less right now
_collector_saved: tuple[int, ...] = ()


@contextmanager
def young_garbage_collected_less() -> Iterator[None]:
    """Fewer garbage-collector passes, none of them over what was alive before: for a pull, or the simulator.

    Every vendor call allocates hundreds of objects (requests, futures, decoded JSON) that die young, so the
    collector ran every few calls, and each full pass walked the whole process (Dagster, DuckDB's bindings):
    11-20 % of a pull's CPU. ``gc.freeze`` sets what was alive aside until the end. The collector's settings
    are the process's, so uses that nest or overlap (in threads) share them: the first one in sets them,
    the last one out restores them.
    """
    global _collector_users, _collector_saved
    with _collector_lock:
        if _collector_users == 0:
            _collector_saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_collector_saved[0], GC_YOUNG_THRESHOLD), *_collector_saved[1:])
        _collector_users += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_users -= 1
            if _collector_users == 0:
                gc.set_threshold(*_collector_saved)
                gc.unfreeze()
