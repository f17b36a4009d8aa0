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
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import duckdb
import pytest
import requests

from m365_pipeline.api_bodies import BILLING_ITEM_FIELDS, BILLING_LICENSE_FIELDS, BILLING_ORG_FIELDS
from m365_pipeline.settings import DUCKDB_FILE
from m365_pipeline.simulator import Simulator

from .helpers import rule9, run_pipeline_at
from .test_dashboard_billing import (
    CLOSED,
    METRICS,
    NIGHTS,
    OPEN,
    config,
    expected_licenses,
    expected_month,
    month_days,
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


@pytest.mark.parametrize("month", [CLOSED, OPEN])
def test_rule14_every_organization_figure_and_total_of_a_month(billing, month):
    base_url, _ = billing
    answer = get(base_url, "billing", month=month).json()
    days = month_days(month, closed=month == CLOSED)
    kept = sorted(d for d in NIGHTS if d.startswith(month))
    assert {k: answer[k] for k in ("status", "month", "closed", "nights", "first_night", "last_night", "days")} == {
        "status": "success", "month": month, "closed": month == CLOSED, "nights": len(kept),
        "first_night": kept[0], "last_night": kept[-1], "days": len(days)}
    expected = expected_month(month)
    assert [row["organization_name"] for row in answer["organizations"]] == list(expected)  # rule 9's order
    for row in answer["organizations"]:
        assert list(row) == list(BILLING_ORG_FIELDS)
        want = expected[row["organization_name"]]
        for metric in METRICS:
            figures = want[metric]
            assert (row[f"{metric}_peak"], row[f"{metric}_end"], row[f"{metric}_seat_days"]) == \
                (figures["peak"], figures["end"], figures["seat_days"]), (row["organization_name"], metric)
            assert row[f"{metric}_average"] == average(figures["seat_days"], len(days))
        assert row["nights"] == sum(1 for d in kept if row["organization_name"] in _present(d))
    totals = answer["totals"]
    assert totals["total_organizations"] == len(answer["organizations"])
    for field in BILLING_ORG_FIELDS[2:]:
        assert totals[f"total_{field}"] == pytest.approx(sum(row[field] for row in answer["organizations"]), abs=1e-9)


def _present(day: str) -> set[str]:
    from m365_pipeline.simulator import ground_truth

    return {o["organization_name"] for o in ground_truth(config(NIGHTS[day]))["organizations"]}


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
    assert json.loads(sealed[("report", "json")])["sha256"] == hashlib.sha256(sealed[("report", "csv")]).hexdigest()
