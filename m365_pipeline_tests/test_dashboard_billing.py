"""The dashboard's Billing view (issue 23, outcome 5; docs/RULES.md, rules 14 and 15) in real headless
Chromium against a real m365-serve, on three nights the real pipeline published at their dates (libfaketime)
from the evolving simulator, across a month boundary: February 2026 is closed (a March night exists) and
March is open. Expected figures come from the simulator's ground truth of each night, read by rule 14 here.
"""

from __future__ import annotations

import calendar
import csv
import hashlib
import io
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect

from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import DEPARTURE_NIGHT

from .helpers import rule9, rule16, run_pipeline_at, spawn_serve
from .test_dashboard_page import (  # noqa: F401 (browser and context are fixtures)
    CHROMIUM,
    browser,
    context,
    download_with_bom,
    new_context,
    save_screenshot,
    watch,
)

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime: sh scripts/system-packages.sh "
                       "faketime"),
]
# date -> simulator night: February's only night is on the 26th (its first 25 days carry nothing), and
# March's first day carries February's last night.
NIGHTS = {"2026-02-26": 0, "2026-03-02": 2, "2026-03-03": DEPARTURE_NIGHT}
CLOSED, OPEN = "2026-02", "2026-03"
METRICS = ("es_user_count", "m365_licensed_user_count", "backup_seats")
BASES = {"peak": "Peak (highest day)", "end": "End of month", "average": "Daily average"}
HOSTILE = "<script>alert('x')</script> 株式会社 'Sakura'"  # the simulator's organization with markup


def config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=10, users_per_org=12, seed=7, night=night, faults=FaultConfig())


def serve(data_dir: Path, log_path: Path) -> tuple[str, Any]:
    port = free_port()
    with log_path.open("w") as log:
        proc = spawn_serve(data_dir, port, log)
    wait_for_port(port, proc)
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def billing_nights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("dashboard-billing")
    data_dir = tmp / "data"
    for day, night in NIGHTS.items():
        with Simulator(config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00"), day
    base_url, proc = serve(data_dir, tmp / "serve.log")
    try:
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- rule 14, read independently of the SQL, from each night's ground truth ------------------------
# ``kept``: date -> the ground truth of the night kept on that date (default: NIGHTS'), so other tests
# read their own histories (a replaced night, a gap, another simulator configuration) the same way.

Kept = dict[str, dict[str, Any]]


@cache
def nights_kept() -> Kept:
    return {day: ground_truth(config(night)) for day, night in NIGHTS.items()}


def night_counts(truth: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Organization -> its three counts on that night (backup seats: rule 13's active rows)."""
    coverage = {o["organization_name"]: o for o in truth["coverage"]["organizations"]}
    counts = {}
    for org in truth["organizations"]:
        name = org["organization_name"]
        cov = coverage.get(name, {})
        counts[name] = {"es_user_count": org["es_user_count"],
                        "m365_licensed_user_count": org["m365_licensed_user_count"],
                        "backup_seats": cov.get("es_users_backed_up", 0)
                        + cov.get("backed_up_without_email_license", 0)}
    return counts


def is_closed(month: str, kept: Kept | None = None) -> bool:
    """Rule 14: a kept night is dated after the month."""
    return any(day[:7] > month for day in kept or nights_kept())


def month_days(month: str, closed: bool | None = None, kept: Kept | None = None) -> list[date]:
    kept = kept or nights_kept()
    closed = is_closed(month, kept) if closed is None else closed
    year, number = map(int, month.split("-"))
    first = date(year, number, 1)
    last = date(year, number, calendar.monthrange(year, number)[1]) if closed else \
        max(date.fromisoformat(d) for d in kept if d.startswith(month))
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def in_force(day: date, kept: Kept | None = None) -> str | None:
    """The date of the night in force on ``day``: the latest kept night dated on or before it."""
    dates = [d for d in kept or nights_kept() if date.fromisoformat(d) <= day]
    return max(dates) if dates else None


def figures(per_day: list[int]) -> dict[str, float]:
    return {"peak": max(per_day), "end": per_day[-1], "seat_days": sum(per_day),
            "average": sum(per_day) / len(per_day)}


def expected_month(month: str, kept: Kept | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Organization -> metric -> {peak, end, seat_days, average (unrounded)}, the organizations of M's report."""
    kept = kept or nights_kept()
    nights = {day: night_counts(truth) for day, truth in kept.items()}
    forced = [in_force(d, kept) for d in month_days(month, kept=kept)]
    present = {o for d in kept if d.startswith(month) for o in nights[d]}
    names = set(present)
    for n in forced:
        if n is not None:
            names |= {o for o, c in nights[n].items() if any(c.values())}
    return {name: {m: figures([nights[n].get(name, {}).get(m, 0) if n is not None else 0 for n in forced])
                   for m in METRICS} for name in sorted(names, key=rule9)}


def expected_licenses(month: str, org: str, kept: Kept | None = None) -> dict[str, dict[str, Any]]:
    """License name (lower-cased) -> figures of the organization's users holding it, by rule 14, and
    ``license_name``: its spelling, the first by rule 9 of those on the nights in force on the month's days."""
    kept = kept or nights_kept()
    holders: dict[str, Counter] = {}
    spellings: dict[str, dict[str, set[str]]] = {}
    for day, truth in kept.items():
        count: Counter = Counter()
        spelled: dict[str, set[str]] = {}
        for user in truth["users"].get(org, []):
            names = [name for name in user["licenses"].split(", ") if name]
            count.update({name.lower() for name in names})
            for name in names:
                spelled.setdefault(name.lower(), set()).add(name)
        holders[day], spellings[day] = count, spelled
    forced = [in_force(d, kept) for d in month_days(month, kept=kept)]
    in_force_nights = {n for n in forced if n is not None}
    names = {name for n in in_force_nights for name in holders[n]}
    return {name: {**figures([holders[n][name] if n is not None else 0 for n in forced]),
                   "license_name": min((s for n in in_force_nights for s in spellings[n].get(name, ())), key=rule9)}
            for name in names}


# -- reading the page ------------------------------------------------------------------------------

def open_billing(page_context, base_url: str) -> tuple[Page, Any]:
    page = page_context.new_page()
    seen = watch(page)
    page.goto(base_url + "/")
    expect(page.locator("#content")).to_be_visible()
    page.get_by_role("tab", name="Billing months").click()
    expect(page.locator("#billing-table")).to_be_visible()
    return page, seen


def billing_rows(page: Page) -> list[list[str]]:
    return page.evaluate("""() => [...document.querySelectorAll('#billing-rows tr:not([hidden])')]
        .filter((tr) => tr.querySelector('button.org-link'))
        .map((tr) => [tr.querySelector('button.org-link').textContent, ...[...tr.cells].slice(1)
        .map((c) => c.textContent)])""")


def billing_button(page: Page, name: str):
    """The billing row button whose text is exactly ``name`` (text filters ignore case and spacing)."""
    buttons = page.locator("#billing-rows button.org-link")
    names = buttons.all_text_contents()
    assert names.count(name) == 1, (name, names)
    return buttons.nth(names.index(name))


def shown(value: float, basis: str) -> str:
    """A figure as the en-US page writes it: averages with two decimals, counts whole, thousands separated."""
    return f"{value:,.2f}" if basis == "average" else f"{int(value):,}"


def api(base_url: str, path: str, **params: str) -> requests.Response:
    return requests.get(base_url + path, params=params, timeout=10)


# -- the tests -----------------------------------------------------------------------------------

def test_the_month_picker_lists_the_kept_months_open_and_closed_with_the_seal(context, billing_nights):  # noqa: F811
    """Rule 15: the closed month shows the short SHA-256 of its CSV, computed here from the bytes."""
    closed_csv = api(billing_nights, "/api/m365/billing", month=CLOSED, format="csv")
    assert closed_csv.status_code == 200
    seal = hashlib.sha256(closed_csv.content).hexdigest()
    page, seen = open_billing(context, billing_nights)
    month = page.get_by_label("Month", exact=True)
    # Newest first; the open month chosen, the closed one sealed (its seal arrives with its answer).
    expect(month.locator("option").nth(1)).to_have_text(f"February 2026 · sealed {seal[:12]}")
    assert month.locator("option").all_inner_texts() == ["March 2026 · open", f"February 2026 · sealed {seal[:12]}"]
    assert month.input_value() == OPEN
    state = page.locator("#billing-state")
    expect(state).to_contain_text("Open")
    assert state.get_attribute("data-state") == "open"
    assert "3 days, 2 kept nights (Mar 2, 2026 to Mar 3, 2026)" in state.inner_text()
    month.select_option(CLOSED)
    expect(state).to_contain_text("Closed")
    assert state.get_attribute("data-state") == "closed"
    assert page.locator("#billing-state .billing-seal").inner_text() == seal[:12]
    assert seal in page.locator("#billing-state .billing-seal").get_attribute("title")
    assert "28 days, 1 kept night (Feb 26, 2026)" in state.inner_text()
    save_screenshot(page, "dashboard-billing-closed-desktop.png")
    seen.assert_clean(page)


@pytest.mark.parametrize("month", [CLOSED, OPEN])
def test_each_basis_shows_rule_14s_figures_with_totals_search_and_sorting(context, billing_nights, month):  # noqa: F811
    expected = expected_month(month)
    page, seen = open_billing(context, billing_nights)
    page.get_by_label("Month", exact=True).select_option(month)
    expect(page.locator("#billing-rows tr")).to_have_count(len(expected))
    basis_picker = page.get_by_label("Basis", exact=True)
    for basis, label in BASES.items():
        basis_picker.select_option(label=label)
        rows = billing_rows(page)
        assert [r[0] for r in rows] == list(expected)  # rule 9's order, the exact names
        for (name, *cells), org in zip(rows, expected.values(), strict=True):
            for metric, cell in zip(METRICS, cells, strict=True):
                want = org[metric][basis]
                if basis == "average":  # rule 14 rounds to two decimals; the page shows what the API rounded
                    assert abs(float(cell.replace(",", "")) - want) <= 0.005 + 1e-9, (name, metric, cell, want)
                else:
                    assert cell == shown(want, basis), (name, metric, basis)
        # The totals are the sums of the rows.
        for metric, cell_id in zip(METRICS, ("billing-total-es", "billing-total-m365", "billing-total-backup"),
                                   strict=True):
            total = float(page.locator(f"#{cell_id}").inner_text().replace(",", ""))
            column = [float(r[1 + METRICS.index(metric)].replace(",", "")) for r in rows]
            assert abs(total - sum(column)) <= 0.011 * len(column), (metric, basis)
            if basis != "average":
                assert total == sum(o[metric][basis] for o in expected.values())
        assert page.locator("#billing-total-orgs").inner_text() == f"{len(expected)} organizations"

    # Search: only the matching rows, and the Total row sums them.
    basis_picker.select_option(label=BASES["peak"])
    search = page.get_by_label("Search billed organizations")
    search.fill("acme")
    matching = {n: o for n, o in expected.items() if "acme" in n.lower()}
    assert len(matching) == 2
    expect(page.locator("#billing-total-orgs")).to_have_text("of 2 shown organizations")
    assert [r[0] for r in billing_rows(page)] == list(matching)
    assert page.locator("#billing-total-backup").inner_text() == \
        shown(sum(o["backup_seats"]["peak"] for o in matching.values()), "peak")
    search.fill("")
    # Sorting by backup seats: largest first, ties by name; again for smallest first.
    header = page.locator('#billing-table thead th[data-key="backup_seats"]')
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    order = sorted(expected, key=lambda n: (-expected[n]["backup_seats"]["peak"], rule9(n)))
    assert [r[0] for r in billing_rows(page)] == order
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    order = sorted(expected, key=lambda n: (expected[n]["backup_seats"]["peak"], rule9(n)))
    assert [r[0] for r in billing_rows(page)] == order
    # Markup in a name is text: the simulator's <script> organization is in February's report (present, no users).
    assert HOSTILE in expected
    expect(page.locator("#billing-rows button.org-link", has_text="株式会社")).to_have_text(HOSTILE)
    assert page.locator("#billing script, #billing b, #billing img").count() == 0
    seen.assert_clean(page)


def test_an_organizations_drill_down_lists_its_licenses_for_the_month(context, billing_nights):  # noqa: F811
    page, seen = open_billing(context, billing_nights)
    page.get_by_label("Month", exact=True).select_option(CLOSED)
    expected_orgs = expected_month(CLOSED)
    org = max((n for n in expected_orgs if n != HOSTILE),
              key=lambda n: expected_orgs[n]["m365_licensed_user_count"]["peak"])
    licenses = expected_licenses(CLOSED, org)
    assert licenses
    billing_button(page, org).click()
    dialog = page.locator("#billing-dialog")
    expect(dialog).to_be_visible()
    assert page.locator("#billing-org-title").text_content() == org
    expect(page.locator("#billing-org-table")).to_be_visible()
    rows = page.evaluate("""() => [...document.querySelectorAll('#billing-org-rows tr')].map((tr) =>
        [...tr.cells].map((c) => c.textContent))""")
    names = [r[0] for r in rows]
    assert names == sorted(names, key=rule9) and sorted(n.lower() for n in names) == sorted(licenses)
    for name, peak, end, average, seat_days in rows:
        want = licenses[name.lower()]
        assert (peak, end, seat_days) == (shown(want["peak"], "peak"), shown(want["end"], "end"),
                                          shown(want["seat_days"], "seat_days"))
        assert abs(float(average) - want["average"]) <= 0.005 + 1e-9
    # Its licenses CSV: the API's bytes of ?org= after a byte-order mark.
    body = download_with_bom(page, page.get_by_role("link", name="Download licenses CSV"),
                             api(billing_nights, "/api/m365/billing", month=CLOSED, org=org, format="csv"))
    assert len(list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))) == len(rows) + 1
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    seen.assert_clean(page)


def test_the_month_csv_and_the_items_feed_download_with_a_byte_order_mark(context, billing_nights):  # noqa: F811
    page, seen = open_billing(context, billing_nights)
    for month in (OPEN, CLOSED):
        page.get_by_label("Month", exact=True).select_option(month)
        expect(page.locator("#billing-csv")).to_have_attribute("href", f"api/m365/billing?month={month}&format=csv")
        month_csv = download_with_bom(page, page.get_by_role("link", name="Download month CSV"),
                                      api(billing_nights, "/api/m365/billing", month=month, format="csv"))
        lines = list(csv.reader(io.StringIO(month_csv.decode("utf-8-sig"))))
        assert [line[0] for line in lines[1:]] == [rule16(n) for n in expected_month(month)]  # CSV cells, rule 16
        items = download_with_bom(page, page.get_by_role("link", name="Download billing items CSV"),
                                  api(billing_nights, "/api/m365/billing/items", month=month, format="csv"))
        rows = list(csv.DictReader(io.StringIO(items.decode("utf-8-sig"))))
        assert {r["organization_name"] for r in rows} == {rule16(n) for n in expected_month(month)}
    seen.assert_clean(page)


def test_the_billing_table_reaches_every_column_at_390_px(browser, billing_nights):  # noqa: F811
    ctx = new_context(browser, {"width": 390, "height": 844})
    try:
        page, seen = open_billing(ctx, billing_nights)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        headers = page.locator("#billing-table thead th")
        for i in range(headers.count()):
            headers.nth(i).scroll_into_view_if_needed()
            box = headers.nth(i).bounding_box()
            assert box and 0 <= box["x"] and box["x"] + box["width"] <= 391, (i, box)
        save_screenshot(page, "dashboard-billing-390.png")
        seen.assert_clean(page)
    finally:
        ctx.close()
