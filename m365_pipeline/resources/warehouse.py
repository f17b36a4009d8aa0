"""The pipeline's working DuckDB file, as a Dagster resource."""

from pathlib import Path

from dagster import InitResourceContext
from dagster_duckdb import DuckDBResource


class WarehouseResource(DuckDBResource):
    """``m365.duckdb`` in M365_DATA_DIR. Its directory is made when a run starts, never when the
    code location loads, so loading the definitions creates nothing."""

    def setup_for_execution(self, context: InitResourceContext) -> None:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
