"""Small DuckDB helpers shared by the asset layers."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from importlib import resources
from operator import itemgetter
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


def run_sql(conn: duckdb.DuckDBPyConnection, name: str, params: list[Any] | None = None) -> None:
    """Run ``sql/<name>`` after the shared rule macros (``sql/macros.sql``) on this connection."""
    conn.execute(read_sql("macros.sql"))
    conn.execute(read_sql(name), params or [])


def marts_table_exists(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(conn.execute("""
        SELECT count(*) FROM information_schema.tables WHERE table_schema = 'marts' AND table_name = $1""",
                             [table]).fetchone()[0])


def path_literal(path: object) -> str:
    """A file path as a SQL string literal: COPY and ATTACH take no parameter for it. Only for paths the
    pipeline makes (its data directory and version ids), never for vendor values."""
    return "'" + str(path).replace("'", "''") + "'"


def ensure_schema(conn: duckdb.DuckDBPyConnection, schema: str) -> None:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")


def last_collected(conn: duckdb.DuckDBPyConnection) -> datetime | None:
    return conn.execute(LAST_COLLECTED_SQL).fetchone()[0]


def rows_by_first_column(cursor: duckdb.DuckDBPyConnection, batch_size: int = 50_000
                         ) -> Iterator[tuple[Any, list[tuple]]]:
    """The rows of an executed query sorted by its first column, one group at a time.

    Groups are yielded as (key, rows without the key) so a writer holds one organization's rows
    in memory, not the whole result (the publish step's memory at 1M users depends on it).
    """
    rows = itertools.chain.from_iterable(iter(lambda: cursor.fetchmany(batch_size), []))
    for key, group in itertools.groupby(rows, key=itemgetter(0)):
        yield key, [row[1:] for row in group]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table for Dagster's metadata panel; cells are escaped so a vendor value cannot break it."""
    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) if len(lines) > 2 else "_(no rows)_"


def markdown_preview(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> str:
    """The rows of ``sql`` as a small Markdown table."""
    cursor = conn.execute(sql, params or [])
    return markdown_table([column[0] for column in cursor.description], cursor.fetchall())


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


def fetch_dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """A query's rows, each a dict by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
