"""The pipeline's working DuckDB file, as a Dagster resource."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dagster import InitResourceContext
from dagster_duckdb import DuckDBResource

from m365_pipeline.run_lock import RunLockHeld, run_lock
from m365_pipeline.run_retries import do_not_retry_run


class WarehouseResource(DuckDBResource):
    """``m365.duckdb`` in M365_DATA_DIR. Its directory is made when a run starts, never when the
    code location loads, so loading the definitions creates nothing. A run holds the data
    directory's writer lock (m365_pipeline/run_lock.py) from its start to its end."""

    @contextmanager
    def yield_for_execution(self, context: InitResourceContext) -> Iterator["WarehouseResource"]:
        data_dir = Path(self.database).parent
        data_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as held:
            try:
                held.enter_context(run_lock(data_dir, context.run_id))
            except RunLockHeld:
                if context.instance is not None and context.run_id:
                    do_not_retry_run(context.instance, context.run_id)  # a retry now would only collide again
                raise
            yield self.create_resource(context)
