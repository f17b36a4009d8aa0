"""Nights (docs/RULES.md, rule 11) and changes (rule 12): the real pipeline run on several dates
(libfaketime) against simulators that differ from night to night, checked in DuckDB, in the
analytics copy and through a real m365-serve. Expected answers come from the simulator's ground
truth of each night and an independent, plain-Python reading of rule 12 below."""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests

from m365_pipeline.assets.billing import record_license_counts
from m365_pipeline.duckdb_helpers import read_sql
from m365_pipeline.publishing import export_dir, published_manifest
from m365_pipeline.settings import ANALYTICS_FILE, DUCKDB_FILE
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import DEPARTURE_NIGHT

from .helpers import dicts, expected_changes, query, rule9, rule16, run_pipeline_at, spawn_serve

pytestmark = [
    pytest.mark.slow,  # every night is a whole pipeline run in its own process
    pytest.mark.skipif(shutil.which("faketime") is None,
                       reason="needs libfaketime: sh scripts/system-packages.sh faketime"),
]

CHANGE_FIELDS = ["organization_name", "previous_organization_name", "user_principal_name", "display_name",
                 "change", "licenses_before", "licenses_after", "has_email_license_before",
                 "has_email_license_after"]
# (moment the run starts, simulator shape). Night 2 runs twice: the second run replaces the first.
RUNS = [
    ("2026-01-20 23:00:00", (6, 12)),
    ("2026-01-21 23:00:00", (7, 12)),  # replaced by the next run on the same date
    ("2026-01-21 23:30:00", (6, 11)),
    ("2026-01-23 23:00:00", (7, 13)),  # no run on the 22nd; an organization arrives
]
BLOCKED = ("2026-01-24 23:00:00", (3, 13))  # far fewer organizations: held back by a blocking check
KEPT = {"2026-01-20": (6, 12), "2026-01-21": (6, 11), "2026-01-23": (7, 13)}
SEED = 7


def config(shape: tuple[int, int]) -> SimulatorConfig:
    return SimulatorConfig(orgs=shape[0], users_per_org=shape[1], seed=SEED, faults=FaultConfig())


def published(shape: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """UPN -> rule-7 row with its organization, from the ground truth (not the pipeline)."""
    truth = ground_truth(config(shape))
    return {u["user_principal_name"]: {**u, "organization_name": org}
            for org, users in truth["users"].items() for u in users}


def history_rows(shape: tuple[int, int], org: str | None) -> dict[str, int] | None:
    truth = ground_truth(config(shape))
    if org is None:
        return {"es_user_count": truth["totals"]["total_es_users"],
                "m365_licensed_user_count": truth["totals"]["total_m365_licensed_users"]}
    for row in truth["organizations"]:
        if row["organization_name"] == org:
            return {"es_user_count": row["es_user_count"], "m365_licensed_user_count": row["m365_licensed_user_count"]}
    return None


@dataclass
class Nights:
    data_dir: Path
    base_url: str
    blocked_succeeded: bool

    @property
    def db(self) -> Path:
        return self.data_dir / DUCKDB_FILE

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.base_url + path, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("nights") / "data"
    for moment, shape in RUNS:
        with Simulator(config(shape), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, moment), moment
    with Simulator(config(BLOCKED[1]), host="127.0.0.1", port=0) as sim:
        blocked = run_pipeline_at(sim, data_dir, BLOCKED[0])
    from m365_pipeline.processes import free_port, wait_for_port

    port = free_port()
    with (data_dir.parent / "serve.log").open("w") as log:
        proc = spawn_serve(data_dir, port, log)
    try:
        wait_for_port(port, proc)
        yield Nights(data_dir, f"http://127.0.0.1:{port}", blocked)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_one_night_per_published_date_and_a_blocked_run_leaves_none(nights):
    assert not nights.blocked_succeeded
    kept = query(nights.db, "SELECT strftime(collection_date, '%Y-%m-%d'), last_collected FROM marts.nights "
                            "ORDER BY 1")
    assert [day for day, _ in kept] == list(KEPT)
    # The 21st was published twice; the night kept is the second run's (23:30), not the first's.
    assert kept[1][1].hour == 23 and kept[1][1].minute >= 30
    dates = query(nights.db, "SELECT DISTINCT strftime(collection_date, '%Y-%m-%d') FROM marts.org_summary_history "
                             "ORDER BY 1")
    assert [d for (d,) in dates] == list(KEPT)


@pytest.mark.parametrize("day", list(KEPT))
def test_published_users_on_each_kept_night_equal_that_nights_ground_truth(nights, day):
    rows = dicts(nights.db, "SELECT * FROM marts.published_users_on($1::DATE)", [day])
    assert {r["user_principal_name"]: r for r in rows} == published(KEPT[day])


def license_holders(shape: tuple[int, int]) -> Counter:
    """(organization, license name as spelled) -> holders among the night's published users, from the truth."""
    return Counter((u["organization_name"], name) for u in published(shape).values()
                   for name in u["licenses"].split(", ") if u["licenses"])


@pytest.mark.parametrize("day", list(KEPT))
def test_each_kept_nights_license_holders_equal_that_nights_ground_truth(nights, day):
    # The 21st was published twice: only the second run's counts are kept (the first's were forgotten).
    rows = query(nights.db, "SELECT organization_name, license_name, users, license_users, first_spelling "
                            "FROM marts.org_license_history WHERE collection_date = $1::DATE", [day])
    holders = license_holders(KEPT[day])
    assert {(org, name): users for org, name, users, _, _ in rows} == holders
    # Rule 14: names equal ignoring case are one license, on the row of its first spelling.
    licenses: dict[tuple[str, str], list[str]] = {}
    for org, name in sorted(holders):
        licenses.setdefault((org, name.lower()), []).append(name)
    assert {(org, name.lower()): total for org, name, _, total, first in rows if first} == \
        {key: sum(holders[(key[0], name)] for name in names) for key, names in licenses.items()}
    assert {(org, name) for org, name, _, _, first in rows if first} == \
        {(org, min(names)) for (org, _), names in licenses.items()}


def test_license_holders_of_nights_kept_before_the_table_are_filled_in_by_the_next_publish(nights, tmp_path):
    """A database from before marts.org_license_history: the next publish records every kept night's, in order."""
    copy = tmp_path / DUCKDB_FILE
    shutil.copy(nights.db, copy)
    with duckdb.connect(str(copy)) as conn:
        conn.execute("DROP TABLE marts.org_license_history")
        conn.execute(read_sql("marts_billing.sql"))
        assert record_license_counts(conn) == list(KEPT)
        for day, shape in KEPT.items():
            rows = conn.execute("SELECT organization_name, license_name, users FROM marts.org_license_history "
                                "WHERE collection_date = $1::DATE", [day]).fetchall()
            assert {(org, name): users for org, name, users in rows} == license_holders(shape)
        assert record_license_counts(conn) == []
        # A forgotten night is recorded again from the night before it; while no published user holds a
        # license there is nothing to record.
        conn.execute("DELETE FROM marts.org_license_history WHERE collection_date = $1::DATE", [max(KEPT)])
        assert record_license_counts(conn) == [max(KEPT)]
        conn.execute("DELETE FROM marts.org_license_history")
        conn.execute("UPDATE marts.published_users_history SET licenses = ''")
        assert record_license_counts(conn) == []


def test_history_storage_grows_with_changes_not_with_nights_times_users(nights):
    def values(shape):
        return {upn: (u["organization_name"], u["display_name"], u["licenses"], u["has_email_license"])
                for upn, u in published(shape).items()}

    shapes = [values(s) for s in KEPT.values()]
    # One row per user of the first night, then one per user whose rule-7 values are new on a night.
    expected = len(shapes[0]) + sum(sum(1 for upn, v in b.items() if a.get(upn) != v)
                                    for a, b in zip(shapes, shapes[1:], strict=False))
    assert query(nights.db, "SELECT count(*) FROM marts.published_users_history")[0][0] == expected
    assert expected < sum(map(len, shapes))


@pytest.mark.parametrize(("a", "b"), [("2026-01-20", "2026-01-21"), ("2026-01-21", "2026-01-23"),
                                      ("2026-01-20", "2026-01-23"), ("2026-01-22", "2026-01-23")])
def test_changes_between_any_two_nights_follow_rule_12_in_duckdb_and_the_analytics_copy(nights, a, b):
    night_of = {d: KEPT[max(k for k in KEPT if k <= d)] for d in (a, b)}
    expected = expected_changes(published(night_of[a]), published(night_of[b]))
    sql = f"SELECT {', '.join(CHANGE_FIELDS)} FROM marts.changes_between($1::DATE, $2::DATE)"
    assert dicts(nights.db, sql, [a, b]) == expected
    assert dicts(nights.data_dir / ANALYTICS_FILE, sql, [a, b]) == expected


def test_the_nights_exercise_the_change_kinds_the_simulators_differ_by(nights):
    kinds = Counter(r["change"] for a, b in [("2026-01-20", "2026-01-21"), ("2026-01-21", "2026-01-23")]
                    for r in dicts(nights.db, "SELECT change FROM marts.changes_between($1::DATE, $2::DATE)",
                                   [a, b]))
    assert {"added", "removed", "email_gained", "licenses_changed"} <= set(kinds), kinds


def test_history_endpoint_has_one_row_per_kept_night_for_totals_and_each_organization(nights):
    body = nights.get("/api/m365/history").json()
    assert body == {"status": "success", "organization": None,
                    "history": [{"date": d, **history_rows(s, None)} for d, s in KEPT.items()]}
    orgs = {o["organization_name"] for s in KEPT.values() for o in ground_truth(config(s))["organizations"]}
    for org in orgs:
        answer = nights.get("/api/m365/history", params={"org": org})
        expected = [{"date": d, **rows} for d, s in KEPT.items() if (rows := history_rows(s, org)) is not None]
        assert answer.json() == {"status": "success", "organization": org, "history": expected}, org
        as_csv = nights.get("/api/m365/history", params={"org": org, "format": "csv"})
        assert as_csv.headers["content-type"].startswith("text/csv") and as_csv.headers["etag"]
        assert as_csv.content == ("date,es_user_count,m365_licensed_user_count\r\n" + "".join(
            f"{r['date']},{r['es_user_count']},{r['m365_licensed_user_count']}\r\n" for r in expected)).encode(), org
    csv_answer = nights.get("/api/m365/history", params={"format": "csv"})
    assert csv_answer.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(csv_answer.text))) == [
        ["date", "es_user_count", "m365_licensed_user_count"],
        *[[d, str(r["es_user_count"]), str(r["m365_licensed_user_count"])]
          for d, s in KEPT.items() for r in [history_rows(s, None)]]]


@pytest.mark.parametrize(("since", "night_a"), [
    (None, "2026-01-21"), ("2026-01-20", "2026-01-20"), ("2026-01-22", "2026-01-21"),
    ("2026-01-23", "2026-01-23"), ("2030-01-01", "2026-01-23"),
])
def test_changes_endpoint_compares_the_latest_night_on_or_before_since_with_tonight(nights, since, night_a):
    params = {"since": since} if since else {}
    body = nights.get("/api/m365/changes", params=params).json()
    expected = expected_changes(published(KEPT[night_a]), published(KEPT["2026-01-23"]))
    stamps = dict(query(nights.db, """
        SELECT strftime(collection_date, '%Y-%m-%d'),
               strftime(last_collected AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ') FROM marts.nights"""))
    assert body == {"status": "success", "from": stamps[night_a], "to": stamps["2026-01-23"],
                    "changes": expected, "total_changes": len(expected)}


def test_changes_for_one_organization_in_json_and_csv(nights):
    expected = expected_changes(published(KEPT["2026-01-20"]), published(KEPT["2026-01-23"]))
    for org in sorted({r["organization_name"] for r in expected}, key=rule9):
        mine = [r for r in expected if org in (r["organization_name"], r["previous_organization_name"])]
        answer = nights.get("/api/m365/changes", params={"since": "2026-01-20", "org": org})
        assert answer.json()["changes"] == mine and answer.json()["total_changes"] == len(mine), org
        as_csv = nights.get("/api/m365/changes", params={"since": "2026-01-20", "org": org, "format": "csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        lines = list(csv.reader(io.StringIO(as_csv.text, newline="")))
        assert lines[0] == CHANGE_FIELDS
        text = {True: "true", False: "false", None: ""}
        assert lines[1:] == [[rule16(r[f]) if isinstance(r[f], str) else text.get(r[f], r[f]) for f in CHANGE_FIELDS]
                             for r in mine], org


def test_an_organization_that_exists_on_no_changes_gets_an_empty_list_not_a_404(nights):
    changed = {r["organization_name"] for r in expected_changes(published(KEPT["2026-01-21"]),
                                                                 published(KEPT["2026-01-23"]))}
    quiet = [o["organization_name"] for o in ground_truth(config(KEPT["2026-01-23"]))["organizations"]
             if o["organization_name"] not in changed]
    for org in quiet:
        assert nights.get("/api/m365/changes", params={"org": org}).json()["changes"] == []


@pytest.mark.parametrize(("path", "params", "status"), [
    ("/api/m365/changes", {"since": "2026-1-20"}, 400),
    ("/api/m365/changes", {"since": "20260120"}, 400),
    ("/api/m365/changes", {"since": "2026-02-30"}, 400),
    ("/api/m365/changes", {"since": "２０２６-01-20"}, 400),
    ("/api/m365/changes", {"format": "xml"}, 400),
    ("/api/m365/history", {"format": "CSV"}, 400),
    ("/api/m365/history", {"org": ""}, 400),
    ("/api/m365/changes", {"since": "2026-01-19"}, 404),  # before the first kept night
    ("/api/m365/changes", {"org": "No Such Org"}, 404),
    ("/api/m365/history", {"org": "<script>alert(1)</script>"}, 404),
    ("/api/m365/history", {"org": "acme \"widgets\" & sons, ltd."}, 404),  # names are exact (rule 9)
])
def test_malformed_parameters_are_400_and_what_matches_nothing_is_404(nights, path, params, status):
    answer = nights.get(path, params=params)
    assert answer.status_code == status
    body = answer.json()
    assert body["status"] == "error" and body["error"]


def test_history_and_changes_revalidate_and_gzip_like_the_documented_endpoints(nights):
    org = ground_truth(config(KEPT["2026-01-23"]))["organizations"][0]["organization_name"]
    for path, params in [("/api/m365/history", {}), ("/api/m365/changes", {"since": "2026-01-20"}),
                         ("/api/m365/changes", {"since": "2026-01-20", "org": org})]:
        first = nights.get(path, params=params, headers={"Accept-Encoding": "identity"})
        assert first.status_code == 200 and first.headers["etag"] and first.headers["last-modified"]
        assert first.headers["access-control-allow-origin"] == "*"
        again = nights.get(path, params=params, headers={"If-None-Match": first.headers["etag"],
                                                         "Accept-Encoding": "identity"})
        assert again.status_code == 304 and again.content == b""
        zipped = nights.get(path, params=params, headers={"Accept-Encoding": "gzip"}, stream=True)
        raw = zipped.raw.read()
        if zipped.headers.get("content-encoding") == "gzip":
            assert gzip.decompress(raw) == first.content
        else:
            assert len(first.content) < 1024 and raw == first.content


def test_a_night_killed_between_its_duckdb_commit_and_its_swap_is_forgotten_by_the_next_night(tmp_path):
    """Rule 11: only published nights count, even when the run dies after recording one."""
    data_dir = tmp_path / "data"
    first, killed, third = ("2026-02-01", (6, 12)), ("2026-02-02", (7, 12)), ("2026-02-03", (6, 11))
    for (day, shape), crash in ((first, None), (killed, "publish-swap"), (third, None)):
        with Simulator(config(shape), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00", crash_at=crash) is (crash is None), day
    db = data_dir / DUCKDB_FILE
    assert query(db, "SELECT strftime(collection_date, '%Y-%m-%d') FROM marts.nights ORDER BY 1") == \
        [(first[0],), (third[0],)]
    # The killed night's users are not kept: on its date the first night's still hold.
    assert {r["user_principal_name"]: r for r in dicts(db, "SELECT * FROM marts.published_users_on($1::DATE)",
                                                       [killed[0]])} == published(first[1])
    sql = f"SELECT {', '.join(CHANGE_FIELDS)} FROM marts.changes_between($1::DATE, $2::DATE)"
    assert dicts(db, sql, [first[0], third[0]]) == expected_changes(published(first[1]), published(third[1]))
    served = published_manifest(export_dir(data_dir))
    assert [n["date"] for n in served["nights"]] == [first[0], third[0]]


# -- the simulator's evolving nights (SimulatorConfig.night) ----------------------------------------
EVOLVING = {"2026-03-01": 0, "2026-03-02": DEPARTURE_NIGHT}  # date -> simulator night


def evolving_config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=10, users_per_org=12, seed=SEED, night=night, faults=FaultConfig())


@pytest.fixture(scope="module")
def evolving_nights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("evolving") / "data"
    for day, night in EVOLVING.items():
        with Simulator(evolving_config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00"), day
    return data_dir / DUCKDB_FILE


def test_every_change_kind_between_two_evolving_simulator_nights_matches_their_ground_truth(evolving_nights):
    def users(night: int) -> dict[str, dict[str, Any]]:
        truth = ground_truth(evolving_config(night))
        return {u["user_principal_name"]: {**u, "organization_name": org}
                for org, rows in truth["users"].items() for u in rows}

    expected = expected_changes(*(users(n) for n in EVOLVING.values()))
    kinds = {r["change"] for r in expected}
    assert kinds == {"added", "removed", "moved", "email_gained", "email_lost", "licenses_changed"}, kinds
    sql = f"SELECT {', '.join(CHANGE_FIELDS)} FROM marts.changes_between($1::DATE, $2::DATE)"
    assert dicts(evolving_nights, sql, list(EVOLVING)) == expected
