"""One writer at a time: a lock on the data directory, held while a step has the working DuckDB file open.

Runs launched through the Dagster instance wait in its run queue, and their DuckDB steps in one
concurrency pool (deploy/dagster.yaml, m365_pipeline/definitions.py); this lock also stops the
writers that bypass both (the CLI on another ``DAGSTER_HOME``, ``execute_in_process``, a second
instance). It is an ``flock`` on a file in the data directory, taken by the step when it opens the
file (m365_pipeline/resources/warehouse.py), never for a whole run, so any executor (in-process,
multiprocess) can run the steps: a step never waits for a lock its own run holds. The kernel drops it
when its process exits, so a killed run never blocks the next night. A writer that finds it held
waits a bounded time for the holder's step to finish, then gives up naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".m365-run.lock"
POLL_S = 0.5


class RunLockHeld(RuntimeError):
    """Another run holds the data directory."""


@contextmanager
def run_lock(data_dir: Path, run_id: str | None, wait_s: float = 0,
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the data directory's writer lock for the body. If another process holds it, wait up to
    ``wait_s`` seconds (``on_wait`` is told who holds it, once), then raise ``RunLockHeld`` naming the holder."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:.0f} s)" if wait_s else ""
                    raise RunLockHeld(
                        f"another run is writing to {data_dir}: {_describe(path)}{waited}. This run changed "
                        "nothing since its last finished step; start it again when that one has finished "
                        "(runs launched from the Dagster UI or the schedule wait in the run queue instead)."
                    ) from None
                if on_wait is not None and not told:
                    on_wait(f"waiting up to {wait_s:.0f} s for another run writing to {data_dir}: {_describe(path)}")
                    told = True
                time.sleep(POLL_S)
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
        return f"run {holder['run_id']}, writing since {holder['started_at']} (pid {holder['pid']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is just starting"
