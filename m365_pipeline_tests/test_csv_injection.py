"""Rule 16 (docs/RULES.md): in every CSV the API serves, a text cell starting with = + - @, a tab or a CR
gets a leading ', with RFC 4180 quoting unchanged; the JSON keeps every value exactly as the vendor sent it.

The simulator's names start with each of these (simulator/dataset.py, FORMULA_NAMES); the CSVs are read
over the real m365-serve and checked cell by cell against its JSON and the rule as helpers.rule16 states it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from m365_pipeline.api_bodies import SORT_FIELDS, SUMMARY_FIELDS, csv_bytes, csv_cell, neutralise
from m365_pipeline.duckdb_helpers import read_sql
from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.publishing import PublishedVersion, current_version_dir, export_dir
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth

from .helpers import rule16, run_pipeline_at, spawn_serve

STARTS = ("=", "+", "-", "@", "\t", "\r")
CASES = [
    ("=1+2", "'=1+2"), ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'), ("+49 30 1234", "'+49 30 1234"),
    ("-2", "'-2"), ("@SUM(A1)", "'@SUM(A1)"), ("\tTab", "'\tTab"), ("\rCR", "'\rCR"), ("\r\nCRLF", "'\r\nCRLF"),
    ("", ""), ("Anna", "Anna"), ("a=b", "a=b"), (" =x", " =x"), ("\n=x", "\n=x"), ("'=x", "'=x"), ("＝x", "＝x"),
    ("=", "'="), ("日本", "日本"),
]


# -- the rule, pure --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), CASES)
def test_rule16_neutralise_prefixes_text_that_starts_like_a_formula(text: str, expected: str) -> None:
    assert neutralise(text) == expected == rule16(text)


@pytest.mark.parametrize(("value", "cell"), [(-5, -5), (0, 0), (12, 12), (True, "true"), (False, "false"),
                                              (None, ""), ("-5", "'-5"), ("true", "true")])
def test_rule16_only_text_cells_are_neutralised_numbers_and_booleans_are_not(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_rule16_csv_bytes_keeps_rfc4180_quoting_around_the_neutralised_cell(text: str, expected: str) -> None:
    body = csv_bytes(("name", "n"), [{"name": text, "n": -1}])
    assert next(csv.reader(io.StringIO(body.decode(), newline=""), strict=True)) == ["name", "n"]
    assert list(csv.reader(io.StringIO(body.decode(), newline=""), strict=True))[1] == [expected, "-1"]


@pytest.fixture(scope="module")
def sql() -> Iterator[duckdb.DuckDBPyConnection]:
    conn = duckdb.connect()
    conn.execute(read_sql("macros.sql"))
    yield conn
    conn.close()


def _sql_record(sql: duckdb.DuckDBPyConnection, text: str | None) -> bytes:
    return sql.execute("SELECT csv_cell($1::VARCHAR) || ',x' || chr(13) || chr(10)", [text]).fetchone()[0].encode()


def _python_record(text: str | None) -> bytes:
    return csv_bytes(("a", "b"), [(text, "x")]).split(b"\r\n", 1)[1]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_rule16_the_sql_macro_is_the_same_rule_as_the_python_writer(sql, text: str, expected: str) -> None:
    assert sql.execute("SELECT csv_neutralise($1::VARCHAR)", [text]).fetchone()[0] == expected
    assert _sql_record(sql, text) == _python_record(text)


@pytest.mark.parametrize(("value", "cell"), [("-1::BIGINT", "-1"), ("0::BIGINT", "0"), ("true", "true"),
                                             ("false", "false"), ("NULL::VARCHAR", None)])
def test_rule16_the_sql_macro_leaves_numbers_and_booleans(sql, value: str, cell: str | None) -> None:
    assert sql.execute(f"SELECT csv_neutralise({value})").fetchone()[0] == cell


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.sampled_from(STARTS), st.text(st.characters(exclude_categories=("Cs",)), max_size=8))
       .flatmap(lambda head: st.text(st.characters(exclude_categories=("Cs",)), max_size=6).map(head.__add__)))
def test_rule16_sql_and_python_agree_on_any_text(sql, text: str) -> None:
    assert _sql_record(sql, text) == _python_record(text)


# -- every CSV over the real server -----------------------------------------------------------------

NIGHTS = (("2026-03-01 23:00:00", 0), ("2026-03-02 23:00:00", 3))  # night 3: a tenant of the CR org moves


def config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=12, users_per_org=10, seed=42, night=night, faults=FaultConfig())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("csv-injection") / "data"
    for moment, night in NIGHTS:
        with Simulator(config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, moment), moment
    port = free_port()
    with (data_dir.parent / "serve.log").open("w") as log:
        proc = spawn_serve(data_dir, port, log)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", data_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def get(base: str, path: str, **params: str) -> requests.Response:
    response = requests.get(f"{base}/api/m365/{path}", params=params, timeout=30)
    assert response.status_code == 200, (path, params, response.text[:200])
    return response


def expected_cell(value: Any) -> str:
    """What the CSV holds for a JSON value, by the documented rules (not by the code under test)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return rule16(value) if isinstance(value, str) else str(value)


def assert_csv_is_json_with_rule16(csv_body: bytes, rows: list[dict[str, Any]], fields: list[str]) -> list[list[str]]:
    records = list(csv.reader(io.StringIO(csv_body.decode("utf-8"), newline=""), strict=True))
    assert records[0] == fields
    assert records[1:] == [[expected_cell(row[f]) for f in fields] for row in rows]
    return records[1:]


def hostile(truth: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The ground truth's published display names and organization names that start like a formula."""
    names = {u["display_name"] for users in truth["users"].values() for u in users if u["display_name"][:1] in STARTS}
    orgs = {o["organization_name"] for o in truth["organizations"] if o["organization_name"][:1] in STARTS}
    return names, orgs


def test_rule16_the_simulator_names_start_with_every_dangerous_character() -> None:
    names, orgs = hostile(ground_truth(config(3)))
    assert {name[0] for name in names | orgs} == set(STARTS)


def test_rule16_export_csv_in_every_sort_neutralised_and_json_exact(served) -> None:
    base, _ = served
    names, orgs = hostile(ground_truth(config(3)))
    for sort in SORT_FIELDS:
        data = get(base, "export", format="json", sort=sort).json()["data"]
        assert names <= {row["display_name"] for row in data}  # JSON: exactly as sent
        assert orgs <= {row["organization_name"] for row in data}
        records = assert_csv_is_json_with_rule16(get(base, "export", format="csv", sort=sort).content, data,
                                                 list(data[0]))
        assert {"'" + name for name in names} <= {record[2] for record in records}
        assert {"'" + org for org in orgs} <= {record[0] for record in records}


def test_rule16_summary_csv_is_its_json_rows_neutralised(served) -> None:
    base, data_dir = served
    summary = get(base, "summary").json()
    assert hostile(ground_truth(config(3)))[1] <= {o["organization_name"] for o in summary["organizations"]}
    version = PublishedVersion(current_version_dir(export_dir(data_dir)))
    records = assert_csv_is_json_with_rule16(version.summary("csv").path.read_bytes(), summary["organizations"],
                                             list(SUMMARY_FIELDS))
    assert len(records) == summary["totals"]["total_organizations"]  # no totals row
    assert [r[0] for r in records if r[0].startswith("'")] == ["'" + o for o in hostile(ground_truth(config(3)))[1]]


def test_rule16_coverage_csvs_for_every_organization(served) -> None:
    base, _ = served
    overview = get(base, "coverage").json()
    assert_csv_is_json_with_rule16(get(base, "coverage", format="csv").content, overview["organizations"],
                                   list(overview["organizations"][0]))
    seen = set()
    for org in overview["organizations"]:
        name = org["organization_name"]
        users = get(base, "coverage", org=name).json()["users"]
        if users:
            assert_csv_is_json_with_rule16(get(base, "coverage", org=name, format="csv").content, users,
                                           list(users[0]))
            seen |= {u["display_name"][:1] for u in users} | {name[:1]}
    assert set(STARTS) <= seen


def test_rule16_changes_and_history_csvs(served) -> None:
    base, _ = served
    changes = get(base, "changes").json()["changes"]
    records = assert_csv_is_json_with_rule16(get(base, "changes", format="csv").content, changes, list(changes[0]))
    cr_org = next(iter(hostile(ground_truth(config(3)))[1]))
    assert any(row["previous_organization_name"] == cr_org for row in changes)  # the CR org's tenant moved
    assert "'" + cr_org in {record[1] for record in records}
    for org in (None, cr_org):
        params = {} if org is None else {"org": org}
        history = get(base, "history", **params).json()["history"]
        assert_csv_is_json_with_rule16(get(base, "history", format="csv", **params).content, history,
                                       list(history[0]))
        if org is not None:
            scoped = get(base, "changes", org=org).json()["changes"]
            assert_csv_is_json_with_rule16(get(base, "changes", org=org, format="csv").content, scoped,
                                           list(scoped[0]))

