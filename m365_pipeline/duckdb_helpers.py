"""Small DuckDB helpers shared by the asset layers."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Any

import duckdb
from dagster import MaterializeResult, MetadataValue, TableColumn, TableSchema

from m365_pipeline.raw_tables import RAW_TABLES


# Contract rule 10: the run's pulls started when the earliest raw table was collected.
LAST_COLLECTED_SQL = "SELECT min(t) FROM (" + " UNION ALL ".join(
    f"SELECT min(collected_at) AS t FROM {table.qualified}" for table in RAW_TABLES
) + ")"


def table_schema(*columns: tuple[str, str, str]) -> TableSchema:
    """``dagster/column_schema`` from (name, type, description) triples."""
    return TableSchema(columns=[TableColumn(name, kind, description=text) for name, kind, text in columns])


def table_metadata(table: str, schema: TableSchema) -> dict[str, object]:
    """Definition metadata of a DuckDB table asset, as the Dagster UI shows it."""
    return {"dagster/table_name": table, "dagster/column_schema": schema}


def read_sql(name: str) -> str:
    return resources.files("m365_pipeline").joinpath("sql", name).read_text(encoding="utf-8")


def ensure_schema(conn: duckdb.DuckDBPyConnection, schema: str) -> None:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")


def last_collected(conn: duckdb.DuckDBPyConnection) -> datetime | None:
    return conn.execute(LAST_COLLECTED_SQL).fetchone()[0]


def markdown_preview(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> str:
    """A small Markdown table for Dagster's metadata panel."""
    frame = conn.execute(sql, params or []).df()
    if frame.empty:
        return "_(no rows)_"
    return frame.astype(str).to_markdown(index=False)


def table_result(conn: duckdb.DuckDBPyConnection, table: str, *, preview_sql: str | None = None,
                 **metadata: Any) -> MaterializeResult:
    """The standard result of a DuckDB table asset: row count, a preview, and extras."""
    rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    preview = markdown_preview(conn, preview_sql or f"SELECT * FROM {table} LIMIT 10")
    return MaterializeResult(metadata={
        "dagster/row_count": rows,
        "dagster/table_name": table,
        **metadata,
        "preview": MetadataValue.md(preview),
    })
