"""The pipeline's working DuckDB file, as a Dagster resource."""

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dagster import Failure, InitResourceContext
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from m365_pipeline.run_launcher import record_cli_worker
from m365_pipeline.run_lock import RunLockHeld, run_lock
from m365_pipeline.run_retries import do_not_retry_run
from m365_pipeline.settings import DataDirError, prepare_data_dir


class WarehouseResource(DuckDBResource):
    """``m365.duckdb`` in M365_DATA_DIR. Its directory is checked (and made) when a run starts,
    never when the code location loads, so loading the definitions creates nothing and a bad
    directory fails the run's first step with one line naming the variable. A step holds the data
    directory's writer lock (m365_pipeline/run_lock.py) while it has the file open
    (``get_connection``), not the run from its start to its end: any executor can run the steps."""

    writer_lock_wait_seconds: int = Field(
        default=600, ge=0,
        description="How long a step waits for another run (outside this instance's run queue and "
                    "concurrency pool) that is writing to the data directory, before it fails naming it.")

    _init: InitResourceContext | None = PrivateAttr(default=None)
    _guard: Any = PrivateAttr(default_factory=threading.RLock)
    _depth: int = PrivateAttr(default=0)
    _held: ExitStack = PrivateAttr(default_factory=ExitStack)

    @contextmanager
    def yield_for_execution(self, context: InitResourceContext) -> Iterator["WarehouseResource"]:
        data_dir = Path(self.database).parent
        try:
            first_run = prepare_data_dir(data_dir)
        except DataDirError as exc:
            raise Failure(str(exc), allow_retries=False) from None
        if first_run:
            context.log.warning(f"first run into {data_dir}: no {Path(self.database).name} there yet, so "
                                "this night starts with no history; if that is not expected, check M365_DATA_DIR")
        if context.instance is not None and context.dagster_run is not None:
            record_cli_worker(context.instance, context.dagster_run)  # so a killed CLI run is failed too
        resource = self.create_resource(context)
        resource._init = context
        yield resource

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        with self._writing(), super().get_connection() as conn:
            try:
                yield conn
            finally:
                # DuckDBResource closes it only when the body succeeds: a failed step would keep the
                # file open in this process, and the next run's steps could not open it.
                conn.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The writer lock, taken by the first connection a step opens and dropped with its last;
        connections opened inside one (same thread) re-enter it."""
        with self._guard:
            if self._depth == 0:
                self._held.enter_context(self._lock())
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._held.close()

    @contextmanager
    def _lock(self) -> Iterator[None]:
        context = self._init
        run_id = context.run_id if context is not None else None
        try:
            with run_lock(Path(self.database).parent, run_id, self.writer_lock_wait_seconds,
                          context.log.warning if context is not None and context.log else None):
                yield
        except RunLockHeld as exc:
            if context is not None and context.instance is not None and run_id:
                do_not_retry_run(context.instance, run_id)  # a retry now would only collide again
            raise Failure(str(exc), allow_retries=False) from None
