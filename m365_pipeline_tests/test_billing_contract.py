"""Rules 14 and 15 over the API: /api/m365/billing (per organization, one organization's licenses) and
/billing/items, JSON and CSV, on nights the real pipeline published at their dates from the evolving
simulator, across a month boundary (February 2026 closed, March open), against rule 14 read independently
from each night's ground truth (test_dashboard_billing's reading); then the seal (rule 15): the closed
month answers the same bytes after a later night, even when the kept history it was computed from changed."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests

import m365_pipeline
from m365_pipeline.api_bodies import (
    BILLING_ITEM_FIELDS,
    BILLING_LICENSE_FIELDS,
    BILLING_ORG_FIELDS,
    BILLING_PARTS,
    FORMATS,
)
from m365_pipeline.assets.billing import _link_sealed_month
from m365_pipeline.license_rules import RULES_FILE
from m365_pipeline.publishing import MANIFEST, PublishedVersion, VersionWriter, current_version_dir, export_dir
from m365_pipeline.settings import DUCKDB_FILE
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import DEPARTURE_NIGHT

from .helpers import query, rule9, run_pipeline_at
from .test_dashboard_billing import (
    CLOSED,
    METRICS,
    NIGHTS,
    OPEN,
    Kept,
    config,
    expected_licenses,
    expected_month,
    in_force,
    is_closed,
    month_days,
    night_counts,
    nights_kept,
    serve,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime")]


@pytest.fixture(scope="module")
def billing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("billing-contract") / "data"
    for day, night in NIGHTS.items():
        with Simulator(config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00"), day
    base_url, proc = serve(data_dir, data_dir.parent / "serve.log")
    try:
        yield base_url, data_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def get(base_url: str, path: str, **params: str) -> requests.Response:
    return requests.get(base_url + "/api/m365/" + path, params=params, timeout=10)


def average(seat_days: float, days: int) -> float:
    """Rule 14: seat-days over days, rounded half up to two decimals."""
    return float((Decimal(int(seat_days)) / Decimal(days)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def csv_rows(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))


def assert_month_report(answer: dict, month: str, kept: Kept | None = None) -> None:
    """Every header field, organization figure and total of ``answer`` (GET /billing?month=) against rule 14
    read from the ground truth of the nights ``kept`` (default: NIGHTS')."""
    kept = kept or nights_kept()
    days = month_days(month, kept=kept)
    closed = is_closed(month, kept)
    dates = sorted(d for d in kept if d.startswith(month))
    assert {k: answer[k] for k in ("status", "month", "closed", "nights", "first_night", "last_night", "days")} == {
        "status": "success", "month": month, "closed": closed, "nights": len(dates),
        "first_night": dates[0], "last_night": dates[-1], "days": len(days)}
    expected = expected_month(month, kept)
    assert [row["organization_name"] for row in answer["organizations"]] == list(expected)  # rule 9's order
    for row in answer["organizations"]:
        assert list(row) == list(BILLING_ORG_FIELDS)
        want = expected[row["organization_name"]]
        for metric in METRICS:
            figures = want[metric]
            assert (row[f"{metric}_peak"], row[f"{metric}_end"], row[f"{metric}_seat_days"]) == \
                (figures["peak"], figures["end"], figures["seat_days"]), (row["organization_name"], metric)
            assert row[f"{metric}_average"] == average(figures["seat_days"], len(days))
        assert row["nights"] == sum(1 for d in dates if row["organization_name"] in
                                    {o["organization_name"] for o in kept[d]["organizations"]})
    totals = answer["totals"]
    assert totals["total_organizations"] == len(answer["organizations"])
    for field in BILLING_ORG_FIELDS[2:]:
        assert totals[f"total_{field}"] == pytest.approx(sum(row[field] for row in answer["organizations"]), abs=1e-9)


@pytest.mark.parametrize("month", [CLOSED, OPEN])
def test_rule14_every_organization_figure_and_total_of_a_month(billing, month):
    assert_month_report(get(billing[0], "billing", month=month).json(), month)


def test_rule14_the_closed_months_first_days_are_carried_from_no_night_and_the_open_month_ends_at_its_night(billing):
    base_url, _ = billing
    closed, opened = get(base_url, "billing", month=CLOSED).json(), get(base_url, "billing", month=OPEN).json()
    assert closed["days"] == 28 and opened["days"] == 3  # February whole; March 1-3, its latest night the 3rd
    # February's only night is the 26th: its first 25 days carry no night, so seat-days are 3 days' counts.
    for row in closed["organizations"]:
        assert row["m365_licensed_user_count_seat_days"] == 3 * row["m365_licensed_user_count_end"]


def test_rule14_each_organizations_licenses_and_the_items_list(billing):
    base_url, _ = billing
    for month in (CLOSED, OPEN):
        days = len(month_days(month, closed=month == CLOSED))
        report = get(base_url, "billing", month=month).json()
        items = get(base_url, "billing/items", month=month).json()
        assert items["total_items"] == len(items["items"]) and items["closed"] == report["closed"]
        listed = iter(items["items"])
        for row in report["organizations"]:
            org = row["organization_name"]
            answer = get(base_url, "billing", month=month, org=org).json()
            assert answer["summary"] == row and answer["organization"] == org and answer["sha256"] == report["sha256"]
            want = {name: f for name, f in expected_licenses(month, org).items() if f["peak"]}
            names = [lic["license_name"] for lic in answer["licenses"]]
            assert names == sorted(names, key=rule9) and sorted(name.lower() for name in names) == sorted(want)
            for lic in answer["licenses"]:
                assert list(lic) == list(BILLING_LICENSE_FIELDS)
                f = want[lic["license_name"].lower()]
                assert (lic["users_peak"], lic["users_end"], lic["users_seat_days"], lic["users_average"]) == \
                    (f["peak"], f["end"], f["seat_days"], average(f["seat_days"], days))
            csv_answer = get(base_url, "billing", month=month, org=org, format="csv")
            assert csv_rows(csv_answer.content)[0] == list(BILLING_LICENSE_FIELDS)
            assert len(csv_rows(csv_answer.content)) == len(answer["licenses"]) + 1
            for kind in ("es_users", "m365_licensed_users", "backup_seats"):
                item = next(listed)
                assert (item["organization_name"], item["item_kind"], item["item"]) == (org, kind, kind)
            for lic in answer["licenses"]:
                item = next(listed)
                assert item == {"organization_name": org, "item_kind": "license", "item": lic["license_name"],
                                "peak": lic["users_peak"], "end": lic["users_end"],
                                "seat_days": lic["users_seat_days"], "average": lic["users_average"]}
        assert next(listed, None) is None
        assert csv_rows(get(base_url, "billing/items", month=month, format="csv").content)[0] == \
            list(BILLING_ITEM_FIELDS)


def test_rule15_sha256_is_the_csvs_and_an_open_month_has_none(billing):
    base_url, _ = billing
    for path, fields in (("billing", BILLING_ORG_FIELDS), ("billing/items", BILLING_ITEM_FIELDS)):
        closed = get(base_url, path, month=CLOSED).json()
        body = get(base_url, path, month=CLOSED, format="csv").content
        assert closed["sha256"] == hashlib.sha256(body).hexdigest()
        assert csv_rows(body)[0] == list(fields)
        assert get(base_url, path, month=OPEN).json()["sha256"] is None
    assert get(base_url, "billing").json()["month"] == OPEN  # without month: tonight's night's month


@pytest.mark.parametrize(("params", "status"), [
    ({"month": "2026-13"}, 400), ({"month": "2026-1"}, 400), ({"month": "abc"}, 400), ({"format": "xml"}, 400),
    ({"month": "2026-01"}, 404), ({"month": CLOSED, "org": "no such organization"}, 404),
    ({"month": CLOSED, "org": ""}, 400),
])
def test_api_billing_errors(billing, params, status):
    answer = get(billing[0], "billing", **params)
    assert answer.status_code == status and answer.json()["status"] == "error"


def bodies(base_url: str, month: str, orgs: list[str]) -> dict[tuple[str, ...], bytes]:
    out = {}
    for fmt in ("json", "csv"):
        out[("report", fmt)] = get(base_url, "billing", month=month, format=fmt).content
        out[("items", fmt)] = get(base_url, "billing/items", month=month, format=fmt).content
        for org in orgs:
            out[("org", org, fmt)] = get(base_url, "billing", month=month, org=org, format=fmt).content
    return out


def test_rule15_a_closed_month_answers_the_same_bytes_after_later_nights_whatever_its_history_became(billing):
    base_url, data_dir = billing
    orgs = [row["organization_name"] for row in get(base_url, "billing", month=CLOSED).json()["organizations"]]
    sealed = bodies(base_url, CLOSED, orgs)
    served = PublishedVersion(current_version_dir(export_dir(data_dir)))
    files = [served.billing(CLOSED, part, fmt).path for part in BILLING_PARTS for fmt in FORMATS]
    # The history the month was computed from changes under it (as a license-rule edit or a forgotten night
    # would change what it computes to), then a later night publishes.
    with duckdb.connect(str(data_dir / DUCKDB_FILE)) as conn:
        before = conn.execute("SELECT * FROM marts.billing_month($1)", [CLOSED]).fetchall()
        conn.execute("UPDATE marts.org_summary_history SET es_user_count = es_user_count + 100, "
                     "m365_licensed_user_count = m365_licensed_user_count + 100 WHERE collection_date = $1",
                     [min(NIGHTS)])
        assert conn.execute("SELECT * FROM marts.billing_month($1)", [CLOSED]).fetchall() != before
    with Simulator(config(max(NIGHTS.values()) + 1), host="127.0.0.1", port=0) as sim:
        assert run_pipeline_at(sim, data_dir, "2026-03-10 23:00:00")
    later: dict = {}
    for _ in range(50):  # the server picks the new version up on its next request
        if get(base_url, "history").json()["history"][-1]["date"] == "2026-03-10":
            later = bodies(base_url, CLOSED, orgs)
            break
    assert later == sealed
    # ... and the later version took the sealed files as they were (linked, not
    # written, hashed or gzipped again).
    now = PublishedVersion(current_version_dir(export_dir(data_dir)))
    assert now.path != served.path
    assert [now.billing(CLOSED, part, fmt).path.stat().st_ino for part in BILLING_PARTS for fmt in FORMATS] == \
        [path.stat().st_ino for path in files]
    assert json.loads(sealed[("report", "json")])["sha256"] == hashlib.sha256(sealed[("report", "csv")]).hexdigest()


def test_rule15_a_sealed_month_is_linked_only_from_a_version_with_the_same_seal(billing, tmp_path):
    """A database restored or replaced under the served version: its sealed bytes, not the served files, win."""
    _, data_dir = billing
    served = current_version_dir(export_dir(data_dir))
    manifest = json.loads((served / MANIFEST).read_bytes())
    copy = tmp_path / DUCKDB_FILE
    shutil.copy(data_dir / DUCKDB_FILE, copy)
    with duckdb.connect(str(copy)) as conn:
        assert _link_sealed_month(conn, VersionWriter(tmp_path / "export"), served, manifest, CLOSED)
        conn.execute("UPDATE marts.billing_sealed SET body = body || '\r\n'::BLOB "
                     "WHERE month = $1 AND part = 'report' AND fmt = 'csv'", [CLOSED])
        writer = VersionWriter(tmp_path / "export")
        assert not _link_sealed_month(conn, writer, served, manifest, CLOSED)
        assert writer.files == {}


# -- a second history for what the first cannot show -----------------------------------------------
# Its own data directory, small: April 2026 closed, May open. The 20th is published twice (the second run
# replaces the first), the 25th's run fails (its vendor is down) and leaves a gap the 20th carries over,
# April's and May's nights spell some license names in two cases (rule 14: one license), and May's last
# night runs with an edited license_rules.csv after April is sealed.
EDGE_CLOSED, EDGE_OPEN = "2026-04", "2026-05"
REPLACED_DAY, FAILED_DAY, EDITED_DAY = "2026-04-20", "2026-04-25", "2026-05-05"
VISIO = "microsoft visio plan 2"  # what the edited rules take out of M365 (rule 4); only this name has "Visio"
RULES_EDIT = "m365.not_visio,m365,exclude,license_name,contains,Visio,Visio is billed apart (a test's edit).\n"


def edge_config(night: int, spelling: str = "catalog", faults: FaultConfig | None = None) -> SimulatorConfig:
    return SimulatorConfig(orgs=8, users_per_org=6, seed=11, night=night, license_spelling=spelling,
                           faults=faults or FaultConfig())


# (moment, simulator, whether it publishes), in order; the edited night comes after these.
EDGE_RUNS = (
    ("2026-04-10 23:00:00", edge_config(0, "lower"), True),
    (f"{REPLACED_DAY} 22:00:00", edge_config(DEPARTURE_NIGHT), True),  # replaced: customers leave, arrive, move
    (f"{REPLACED_DAY} 23:00:00", edge_config(2), True),
    (f"{FAILED_DAY} 23:00:00", edge_config(4, faults=FaultConfig(down_after=0)), False),
    ("2026-05-02 23:00:00", edge_config(3, "upper"), True),
)
EDITED_NIGHT = edge_config(3, "upper")


def without_license(truth: dict[str, Any], name: str) -> dict[str, Any]:
    """The ground truth of a night whose rules no longer count ``name`` (lower-cased) as an M365 license: it
    leaves every user's licenses, and a user it leaves with none is no longer published (rule 7). Neither
    email flags nor backup seats change (it is no email license; rule 13's rows keep every mailbox)."""
    users = {}
    for org, rows in truth["users"].items():
        kept_rows = []
        for user in rows:
            names = [n for n in user["licenses"].split(", ") if n and n.lower() != name]
            if user["licenses"] and not names:
                continue
            kept_rows.append({**user, "licenses": ", ".join(names)})
        users[org] = kept_rows
    organizations = [{**o, "m365_licensed_user_count": len(users[o["organization_name"]])}
                     for o in truth["organizations"]]
    return {**truth, "users": users, "organizations": organizations}


@dataclass
class Edge:
    base_url: str
    data_dir: Path
    published: list[bool]  # per EDGE_RUNS
    kept: Kept  # date -> ground truth of the night kept on it, after the edited night
    before_edit: dict[str, dict[tuple[str, ...], bytes]]  # month -> its bodies before the edited night


def edge_kept(edited: bool) -> Kept:
    kept: Kept = {}
    for moment, cfg, publishes in EDGE_RUNS:
        if publishes:
            kept[moment[:10]] = ground_truth(cfg)  # a later run on the same date replaces the earlier
    if edited:
        kept[EDITED_DAY] = without_license(ground_truth(EDITED_NIGHT), VISIO)
    return kept


def month_orgs(base_url: str, month: str) -> list[str]:
    return [row["organization_name"] for row in get(base_url, "billing", month=month).json()["organizations"]]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("billing-edge")
    data_dir = tmp / "data"
    published = []
    for moment, cfg, _ in EDGE_RUNS:
        with Simulator(cfg, host="127.0.0.1", port=0) as sim:
            published.append(run_pipeline_at(sim, data_dir, moment))
    # The edited rules: a copy of the package whose license_rules.csv has one rule more (the pipeline reads
    # the package's file), which the edited night's run imports instead of the repository's.
    package = tmp / "edited"
    shutil.copytree(Path(m365_pipeline.__file__).parent, package / "m365_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (package / "m365_pipeline" / RULES_FILE).open("a", encoding="utf-8") as rules:
        rules.write(RULES_EDIT)
    base_url, proc = serve(data_dir, tmp / "serve.log")
    try:
        before = {month: bodies(base_url, month, month_orgs(base_url, month)) for month in (EDGE_CLOSED, EDGE_OPEN)}
        with Simulator(EDITED_NIGHT, host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{EDITED_DAY} 23:00:00", package_dir=package)
        for _ in range(50):  # the server picks the new version up on its next request
            if get(base_url, "history").json()["history"][-1]["date"] == EDITED_DAY:
                break
            time.sleep(0.2)
        yield Edge(base_url, data_dir, published, edge_kept(edited=True), before)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rule14_a_same_date_rerun_replaces_its_night_in_the_billing_figures(edge):
    assert edge.published == [True, True, True, False, True]
    dates = [row["date"] for row in get(edge.base_url, "history").json()["history"]]
    assert dates == ["2026-04-10", REPLACED_DAY, "2026-05-02", EDITED_DAY]  # one night on the 20th
    assert_month_report(get(edge.base_url, "billing", month=EDGE_CLOSED).json(), EDGE_CLOSED, edge.kept)
    # The first run's data would give other figures: the figures follow the second run's only.
    first_run = {**edge.kept, REPLACED_DAY: ground_truth(EDGE_RUNS[1][1])}
    assert expected_month(EDGE_CLOSED, first_run) != expected_month(EDGE_CLOSED, edge.kept)


def test_rule14_a_failed_night_leaves_a_gap_that_the_previous_night_carries_over(edge):
    answer = get(edge.base_url, "billing", month=EDGE_CLOSED).json()
    assert (answer["nights"], answer["last_night"], answer["days"]) == (2, REPLACED_DAY, 30)
    assert FAILED_DAY not in edge.kept and not edge.published[3]
    assert_month_report(answer, EDGE_CLOSED, edge.kept)
    # April's last eleven days (the 20th to the 30th, across the failed 25th) carry the 20th's counts.
    counts = night_counts(edge.kept[REPLACED_DAY])
    tenth = night_counts(edge.kept["2026-04-10"])
    for row in answer["organizations"]:
        for metric in METRICS:
            on_20th = counts.get(row["organization_name"], {}).get(metric, 0)
            on_10th = tenth.get(row["organization_name"], {}).get(metric, 0)
            assert row[f"{metric}_end"] == on_20th
            assert row[f"{metric}_seat_days"] == 10 * on_10th + 11 * on_20th, (row["organization_name"], metric)


@pytest.mark.parametrize("month", [EDGE_CLOSED, EDGE_OPEN])
def test_rule14_license_names_equal_ignoring_case_are_one_license_spelled_first_by_rule_9(edge, month):
    days = len(month_days(month, kept=edge.kept))
    items = get(edge.base_url, "billing/items", month=month).json()["items"]
    spelled_twice = 0
    for org in month_orgs(edge.base_url, month):
        want = {f["license_name"]: f for f in expected_licenses(month, org, edge.kept).values() if f["peak"]}
        answer = get(edge.base_url, "billing", month=month, org=org).json()["licenses"]
        assert [lic["license_name"] for lic in answer] == sorted(want, key=rule9), org  # one row per license
        for lic in answer:
            f = want[lic["license_name"]]
            assert (lic["users_peak"], lic["users_end"], lic["users_seat_days"], lic["users_average"]) == \
                (f["peak"], f["end"], f["seat_days"], average(f["seat_days"], days)), (org, lic["license_name"])
        assert [i["item"] for i in items if i["organization_name"] == org and i["item_kind"] == "license"] == \
            [lic["license_name"] for lic in answer]
        # The data does spell licenses in two cases on the nights in force (other users, other nights).
        forced = {in_force(d, edge.kept) for d in month_days(month, kept=edge.kept)} - {None}
        spellings: dict[str, set[str]] = {}
        for night in forced:
            for user in edge.kept[night]["users"].get(org, []):
                for name in filter(None, user["licenses"].split(", ")):
                    spellings.setdefault(name.lower(), set()).add(name)
        spelled_twice += sum(len(s) > 1 for s in spellings.values())
    assert spelled_twice >= 3
    if month == EDGE_OPEN:  # May 2 and 5 serve upper-case spellings: the first by rule 9 where held
        assert any(i["item"].isupper() for i in items if i["item_kind"] == "license")
    else:  # April 10 serves lower-case ones, which sort after the catalog's: these win only where alone
        assert not any(i["item"].isupper() for i in items if i["item_kind"] == "license")


def test_rule15_a_closed_month_answers_the_same_bytes_after_an_edit_of_license_rules(edge):
    # The edited night ran with the edited rules (its core.license_rules has the rule) ...
    assert query(edge.data_dir / DUCKDB_FILE, "SELECT count(*) FROM core.license_rules WHERE rule_id = $1",
                 ["m365.not_visio"]) == [(1,)]
    # ... and April answers exactly the bytes it was sealed with, whose seal is the SHA-256 of the CSV.
    after = bodies(edge.base_url, EDGE_CLOSED, month_orgs(edge.base_url, EDGE_CLOSED))
    assert after == edge.before_edit[EDGE_CLOSED]
    for part in ("report", "items"):
        assert json.loads(after[(part, "json")])["sha256"] == hashlib.sha256(after[(part, "csv")]).hexdigest()
    # May, open, follows the edit: Visio is nobody's license on the 5th, and every figure is rule 14's.
    opened = get(edge.base_url, "billing", month=EDGE_OPEN).json()
    assert opened["sha256"] is None and opened["last_night"] == EDITED_DAY
    assert bodies(edge.base_url, EDGE_OPEN, []) != {k: v for k, v in edge.before_edit[EDGE_OPEN].items()
                                                     if k[0] != "org"}
    assert_month_report(opened, EDGE_OPEN, edge.kept)
    visio_rows = 0
    for org in month_orgs(edge.base_url, EDGE_OPEN):
        for lic in get(edge.base_url, "billing", month=EDGE_OPEN, org=org).json()["licenses"]:
            if lic["license_name"].lower() == VISIO:
                visio_rows += 1
                assert lic["users_end"] == 0 and lic["users_peak"] > 0, org
                assert lic["users_seat_days"] == expected_licenses(EDGE_OPEN, org, edge.kept)[VISIO]["seat_days"]
    assert visio_rows
