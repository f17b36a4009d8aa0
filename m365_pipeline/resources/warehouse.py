"""The pipeline's working DuckDB file, as a Dagster resource."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dagster import Failure, InitResourceContext
from dagster_duckdb import DuckDBResource

from m365_pipeline.run_lock import RunLockHeld, run_lock
from m365_pipeline.run_retries import do_not_retry_run
from m365_pipeline.settings import DataDirError, prepare_data_dir


class WarehouseResource(DuckDBResource):
    """``m365.duckdb`` in M365_DATA_DIR. Its directory is checked (and made) when a run starts,
    never when the code location loads, so loading the definitions creates nothing and a bad
    directory fails the run's first step with one line naming the variable. A run holds the data
    directory's writer lock (m365_pipeline/run_lock.py) from its start to its end."""

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
        with ExitStack() as held:
            try:
                held.enter_context(run_lock(data_dir, context.run_id))
            except RunLockHeld:
                if context.instance is not None and context.run_id:
                    do_not_retry_run(context.instance, context.run_id)  # a retry now would only collide again
                raise
            yield self.create_resource(context)
