"""The small DuckDB helpers every writer relies on."""

from __future__ import annotations

import duckdb
import pytest

from m365_pipeline.duckdb_helpers import path_literal, rows_by_first_column

ROWS = [("a", 1, "x"), ("a", 2, "y"), ("b", 3, "z"), ("c", 4, "w"), ("c", 5, "v"), ("c", 6, "u")]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 50_000])
def test_rows_grouped_by_organization_keep_every_row_whatever_the_fetch_batch(batch_size):
    conn = duckdb.connect()
    conn.execute("CREATE TABLE t (org VARCHAR, n INTEGER, s VARCHAR)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", ROWS)
    expected: dict[str, list[tuple]] = {}
    for org, *rest in ROWS:
        expected.setdefault(org, []).append(tuple(rest))

    groups = list(rows_by_first_column(conn.execute("SELECT * FROM t ORDER BY org, n"), batch_size))

    assert groups == list(expected.items())


def test_an_empty_result_yields_no_group():
    assert list(rows_by_first_column(duckdb.connect().execute("SELECT 1 WHERE false"))) == []


@pytest.mark.parametrize("name", ["plain.csv", "it's.csv", "''.csv", "a'); DROP TABLE t; --.csv"])
def test_a_path_with_quotes_is_one_literal_duckdb_writes_to(tmp_path, name):
    conn = duckdb.connect()
    conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    target = tmp_path / name
    conn.execute(f"COPY t TO {path_literal(target)} (FORMAT csv)")
    assert target.read_text().splitlines() == ["x", "1"]
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
