"""One writer at a time: a lock on the data directory, held by a run from its start to its end.

Runs launched through the Dagster instance wait in its run queue (deploy/dagster.yaml); this lock
also stops the ones that bypass the queue (the CLI, ``execute_in_process``, a second instance). It
is an ``flock`` on a file in the data directory: the kernel drops it when its process exits, so a
killed run never blocks the next night, and a second run is refused at once, never made to wait.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".m365-run.lock"


class RunLockHeld(RuntimeError):
    """Another run holds the data directory."""


@contextmanager
def run_lock(data_dir: Path, run_id: str | None) -> Iterator[None]:
    """Hold the data directory's writer lock for the body, or raise ``RunLockHeld`` naming the holder."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockHeld(
                f"another run is writing to {data_dir}: {_describe(path)}. This run changed nothing; "
                "start it again when that one has finished (runs launched from the Dagster UI or the "
                "schedule wait in the run queue instead)."
            ) from None
        holder = {"run_id": run_id or "unknown", "pid": os.getpid(),
                  "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_bytes())
        return f"run {holder['run_id']}, started {holder['started_at']} (pid {holder['pid']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is just starting"
