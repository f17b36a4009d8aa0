"""The dashboard's nights features (docs/RULES.md, rules 11 and 12) in real headless Chromium against a
real m365-serve, on three nights the real pipeline published at their dates (libfaketime) from the
evolving simulator. Expected numbers come from the simulator's ground truth of each night."""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect

from m365_pipeline.processes import free_port, wait_for_port
from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import DEPARTURE_NIGHT

from .helpers import expected_changes, rule9, rule16, run_pipeline_at, spawn_serve
from .test_dashboard_page import (  # noqa: F401 (browser and context are fixtures)
    CHROMIUM,
    DESKTOP,
    PHONE,
    browser,
    changes_shown,
    context,
    download_with_bom,
    new_context,
    open_dashboard,
    org_button,
    save_screenshot,
)

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime: sh scripts/system-packages.sh "
                       "faketime"),
]
# date -> simulator night. No night on the 2nd: a date between kept nights means the one before it.
NIGHTS = {"2026-03-01": 0, "2026-03-03": 2, "2026-03-04": DEPARTURE_NIGHT}
FIRST, PREVIOUS, TONIGHT = NIGHTS


def config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=10, users_per_org=12, seed=7, night=night, faults=FaultConfig())


def users(night: int) -> dict[str, dict[str, Any]]:
    truth = ground_truth(config(night))
    return {u["user_principal_name"]: {**u, "organization_name": org}
            for org, rows in truth["users"].items() for u in rows}


@pytest.fixture(scope="module")
def kept_nights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("dashboard-nights") / "data"
    for day, night in NIGHTS.items():
        with Simulator(config(night), host="127.0.0.1", port=0) as sim:
            assert run_pipeline_at(sim, data_dir, f"{day} 23:00:00"), day
    port = free_port()
    with (data_dir.parent / "serve.log").open("w") as log:
        proc = spawn_serve(data_dir, port, log)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_each_organization_shows_users_in_and_out_since_the_previous_night(context, kept_nights):  # noqa: F811
    arrived, left = Counter(), Counter()
    changes = expected_changes(users(NIGHTS[PREVIOUS]), users(NIGHTS[TONIGHT]))
    for row in changes:
        if row["change"] in ("added", "moved"):
            arrived[row["organization_name"]] += 1
        if row["change"] == "removed":
            left[row["organization_name"]] += 1
        if row["change"] == "moved":
            left[row["previous_organization_name"]] += 1
    assert arrived and left and any(r["change"] == "moved" for r in changes)
    page, seen = open_dashboard(context, kept_nights)
    expect(page.locator("#delta-heading")).to_be_visible()
    shown = dict(page.evaluate("""() => [...document.querySelectorAll('#org-rows tr')]
        .filter((tr) => tr.querySelector('button.org-link'))
        .map((tr) => [tr.querySelector('button.org-link').textContent, tr.querySelector('.col-delta').textContent])"""))
    tonight = [o["organization_name"] for o in ground_truth(config(DEPARTURE_NIGHT))["organizations"]]
    assert shown == {org: f"+{arrived[org]} / \u2212{left[org]}" for org in tonight}
    added = sum(r["change"] == "added" for r in changes)
    removed = sum(r["change"] == "removed" for r in changes)
    assert page.locator("#total-delta").text_content() == f"+{added} / \u2212{removed}"
    seen.assert_clean(page)


# -- the trend chart in the drill-down (rule 11) ------------------------------------------------

def night_label(day: str, short: bool = False) -> str:
    """A night's date as the en-US page writes it (``Mar 4, 2026``; short: ``Mar 4``), computed here."""
    moment = datetime.strptime(day, "%Y-%m-%d")
    return f"{moment:%b} {moment.day}" + ("" if short else f", {moment.year}")


def night_counts(org: str) -> list[tuple[str, int, int]]:
    """(date, ES, M365 licensed) of ``org`` on each kept night that has it, from that night's ground truth."""
    return [(day, o["es_user_count"], o["m365_licensed_user_count"]) for day, night in NIGHTS.items()
            for o in ground_truth(config(night))["organizations"] if o["organization_name"] == org]


def trend_shown(page: Page) -> dict[str, Any]:
    return page.evaluate("""() => {
        const svg = document.querySelector('#trend-chart svg');
        return {
          rows: [...document.querySelectorAll('#trend-rows tr')].map((tr) => [tr.cells[0].dataset.date,
                 tr.cells[0].textContent, tr.cells[1].textContent, tr.cells[2].textContent]),
          dots: Object.fromEntries([...document.querySelectorAll('#trend-chart g[data-series]')].map((g) => [
                 g.dataset.series, [...g.querySelectorAll('circle')].map((c) => ({date: c.dataset.date,
                 cx: Number(c.getAttribute('cx')), cy: Number(c.getAttribute('cy')),
                 title: c.querySelector('title').textContent}))])),
          lines: document.querySelectorAll('#trend-chart polyline').length,
          xLabels: [...document.querySelectorAll('#trend-chart .trend__tick--x')].map((t) => t.textContent),
          role: svg && svg.getAttribute('role'),
          title: svg && svg.querySelector(':scope > title').textContent,
          desc: svg && svg.querySelector(':scope > desc').textContent,
          note: document.getElementById('trend-note').textContent,
        };
    }""")


def assert_drawn_to_scale(dots: list[dict[str, Any]], values: list[int]) -> None:
    """Each dot's height is one linear function of its count, higher counts higher up (smaller y)."""
    points = [(value, dot["cy"]) for value, dot in zip(values, dots, strict=True)]
    (v0, y0), (v1, y1) = points[0], next(p for p in points if p[0] != points[0][0])
    slope = (y1 - y0) / (v1 - v0)
    assert slope < 0
    for value, y in points:
        assert abs(y - (y0 + slope * (value - v0))) < 0.5, (value, y)


def test_the_drill_down_charts_each_kept_night_of_the_organization_from_the_ground_truth(context, kept_nights):  # noqa: F811
    tonight = [o["organization_name"] for o in ground_truth(config(NIGHTS[TONIGHT]))["organizations"]]
    counts = {org: night_counts(org) for org in tonight}
    varying = next(org for org, rows in counts.items()
                   if len(rows) == len(NIGHTS) and len({r[1] for r in rows}) > 1 and len({r[2] for r in rows}) > 1)
    page, seen = open_dashboard(context, kept_nights)
    org_button(page, varying).click()
    expect(page.locator("#trend-chart svg")).to_be_visible()
    shown = trend_shown(page)
    expected = counts[varying]
    # The accessible table holds exactly the ground truth's numbers, one row per kept night.
    assert shown["rows"] == [[day, night_label(day), f"{es:,}", f"{m365:,}"] for day, es, m365 in expected]
    assert shown["role"] == "img" and varying in shown["title"] and "3 kept nights" in shown["title"]
    first, last = expected[0], expected[-1]
    assert f"M365 licensed went from {first[2]:,} on {night_label(first[0])} to {last[2]:,} on " \
           f"{night_label(last[0])}" in shown["desc"]
    assert f"ES users went from {first[1]:,} on {night_label(first[0])}" in shown["desc"]
    # The dates label the x axis; each series draws a line through one dot per night, to scale.
    assert shown["xLabels"] == [night_label(day, short=True) for day, _, _ in expected]
    assert shown["lines"] == 2
    for key, column, name in (("es_user_count", 1, "ES users"), ("m365_licensed_user_count", 2, "M365 licensed")):
        dots = shown["dots"][key]
        assert [d["date"] for d in dots] == [r[0] for r in expected]
        assert [d["title"] for d in dots] == [f"{night_label(r[0])}: {r[column]:,} {name}" for r in expected]
        # Time to scale too: Mar 1 to Mar 3 is twice as wide as Mar 3 to Mar 4.
        first_gap, second_gap = dots[1]["cx"] - dots[0]["cx"], dots[2]["cx"] - dots[1]["cx"]
        assert second_gap > 0 and abs(first_gap - 2 * second_gap) < 0.5, dots
    both = shown["dots"]["es_user_count"] + shown["dots"]["m365_licensed_user_count"]
    assert_drawn_to_scale(both, [r[1] for r in expected] + [r[2] for r in expected])
    assert shown["note"] == f"3 nights kept, from {night_label(FIRST)} to {night_label(TONIGHT)}."
    page.keyboard.press("Escape")

    # The customer that arrived tonight has one night: one dot per series, no line, and a note saying so.
    arrived = next(org for org, rows in counts.items() if [r[0] for r in rows] == [TONIGHT])
    org_button(page, arrived).click()
    expect(page.locator("#trend-note")).to_contain_text("Only one night is kept")
    shown = trend_shown(page)
    (day, es, m365), = counts[arrived]
    assert shown["rows"] == [[day, night_label(day), f"{es:,}", f"{m365:,}"]]
    assert shown["lines"] == 0 and [len(d) for d in shown["dots"].values()] == [1, 1]
    assert shown["note"] == f"Only one night is kept for this organization so far ({night_label(TONIGHT)}): " \
        "the trend line starts with the next night."
    page.keyboard.press("Escape")
    seen.assert_clean(page)


# -- the Changes view (rule 12) ------------------------------------------------------------------

def expected_csv(rows: list[dict[str, Any]]) -> list[list[str]]:
    cell = {None: "", True: "true", False: "false"}
    return [[cell.get(v, v) if v is None or isinstance(v, bool) else rule16(v) for v in row.values()] for row in rows]


def download_changes_csv(page: Page, base_url: str, params: dict[str, str], night_a: str) -> bytes:
    """Click the Changes view's CSV link; the file must be the API's own CSV of ``params`` after a byte-order
    mark, named after the nights it compares. Returns the API's bytes."""
    api = requests.get(base_url + "/api/m365/changes", params={**params, "format": "csv"}, timeout=10)
    assert api.headers["Content-Disposition"] == f'attachment; filename="m365-changes-{night_a}-to-{TONIGHT}.csv"'
    return download_with_bom(page, page.get_by_role("link", name="Download changes CSV"), api)[3:]


def test_the_changes_view_lists_exactly_the_changes_since_a_chosen_night_and_downloads_them(context, kept_nights):  # noqa: F811
    since_previous = expected_changes(users(NIGHTS[PREVIOUS]), users(NIGHTS[TONIGHT]))
    since_first = expected_changes(users(NIGHTS[FIRST]), users(NIGHTS[TONIGHT]))
    assert since_previous != since_first
    page, seen = open_dashboard(context, kept_nights)
    since = page.get_by_label("Since the night of")
    expect(page.locator("#changes-table")).to_be_visible()
    # The date is limited to the kept nights and starts at the previous night.
    assert (since.input_value(), since.get_attribute("min"), since.get_attribute("max")) == (PREVIOUS, FIRST, TONIGHT)
    assert changes_shown(page) == since_previous
    summary = page.locator("#changes-summary").inner_text()
    assert summary.startswith(f"{len(since_previous)} changes from the night of {night_label(PREVIOUS)} to "
                              f"{night_label(TONIGHT)}: ")
    kinds = Counter(r["change"] for r in since_previous)
    assert f"{kinds['moved']} moved" in summary and f"{kinds['added']} added" in summary
    body = download_changes_csv(page, kept_nights, {"since": PREVIOUS}, PREVIOUS)
    assert list(csv.reader(io.StringIO(body.decode()))) == [list(since_previous[0])] + expected_csv(since_previous)

    since.fill(FIRST)
    expect(page.locator("#changes-summary")).to_contain_text(f"from the night of {night_label(FIRST)}")
    assert changes_shown(page) == since_first
    assert {r["change"] for r in since_first} == {"added", "removed", "moved", "email_gained", "email_lost",
                                                  "licenses_changed"}
    # A customer that left since then can still be chosen, after tonight's organizations.
    tonight = {o["organization_name"] for o in ground_truth(config(NIGHTS[TONIGHT]))["organizations"]}
    left = sorted({r["organization_name"] for r in since_first} - tonight, key=rule9)
    assert left and page.locator("#changes-org optgroup option").all_text_contents() == left
    page.get_by_label("Organization", exact=True).select_option(left[0])
    expect(page.locator("#changes-summary")).to_contain_text(f" in {left[0]} from")
    assert changes_shown(page) == [r for r in since_first if r["organization_name"] == left[0]]
    assert {r["change"] for r in changes_shown(page)} == {"removed"}
    page.get_by_label("Organization", exact=True).select_option("")
    # A date between kept nights means the latest kept night on or before it (rule 12).
    since.fill("2026-03-02")
    expect(page.locator("#changes-summary")).to_contain_text("the latest kept night on or before Mar 2, 2026")
    assert changes_shown(page) == since_first

    # One organization: its changes, including users moved out of it.
    moved = next(r for r in since_first if r["change"] == "moved")
    org = moved["previous_organization_name"]
    page.get_by_label("Organization", exact=True).select_option(org)
    expect(page.locator("#changes-summary")).to_contain_text(f" in {org} from")
    wanted = [r for r in since_first if org in (r["organization_name"], r["previous_organization_name"])]
    assert changes_shown(page) == wanted and moved in wanted
    body = download_changes_csv(page, kept_nights, {"since": "2026-03-02", "org": org}, FIRST)
    assert list(csv.reader(io.StringIO(body.decode())))[1:] == expected_csv(wanted)

    # Before the first kept night: the API's 404 sentence as a message, no table, no CSV link.
    since.fill("2026-02-01")
    message = page.locator("#changes-message")
    expect(message).to_be_visible()
    assert message.inner_text() == "No changes to show: no kept night on or before 2026-02-01."
    expect(page.locator("#changes-table")).to_be_hidden()
    expect(page.get_by_role("link", name="Download changes CSV")).to_be_hidden()
    # Tonight itself: nothing changed since.
    since.fill(TONIGHT)
    expect(message).to_have_text(f"No changes in {org} from the night of {night_label(TONIGHT)} to "
                                 f"{night_label(TONIGHT)}.")
    # The browser logs the 404 itself; nothing else may go wrong.
    assert all("404" in m for m in seen.console_errors), seen.console_errors
    assert seen.page_errors == [] and seen.dialogs == [] and seen.csp_violations(page) == []


@pytest.mark.parametrize(("viewport", "suffix"), [(DESKTOP, "desktop"), (PHONE, "phone")])
def test_the_changes_view_and_the_trend_chart_fit_the_screen(browser, kept_nights, viewport, suffix):  # noqa: F811
    ctx = new_context(browser, viewport)
    try:
        page, seen = open_dashboard(ctx, kept_nights)
        expect(page.locator("#changes-table")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        page.evaluate("document.getElementById('changes').scrollIntoView()")
        save_screenshot(page, f"dashboard-changes-{suffix}.png")
        org_button(page, page.locator("#org-rows button.org-link").first.text_content()).click()
        chart = page.locator("#trend-chart svg")
        expect(chart).to_be_visible()
        # Drawn at the width it is shown at: its 11px text stays 11px on a phone.
        box = chart.bounding_box()
        assert abs(box["width"] - float(chart.get_attribute("viewBox").split()[2])) <= 1
        assert 0 <= box["x"] and box["x"] + box["width"] <= viewport["width"]
        save_screenshot(page, f"dashboard-trend-{suffix}.png")
        page.keyboard.press("Escape")
        seen.assert_clean(page)
    finally:
        ctx.close()


# -- issue 26, item 7: the dashboard, again ---------------------------------------------------------

def tonight_truth() -> dict[str, Any]:
    return ground_truth(config(NIGHTS[TONIGHT]))


def arrivals_and_departures(changes: list[dict[str, Any]]) -> tuple[Counter, Counter]:
    """Per organization, users added or moved in / removed or moved out (the "Since last night" cells)."""
    arrived, left = Counter(), Counter()
    for row in changes:
        if row["change"] in ("added", "moved"):
            arrived[row["organization_name"]] += 1
        if row["change"] == "removed":
            left[row["organization_name"]] += 1
        if row["change"] == "moved":
            left[row["previous_organization_name"]] += 1
    return arrived, left


def test_under_a_search_the_total_row_sums_every_shown_column(context, kept_nights):  # noqa: F811
    truth = tonight_truth()
    arrived, left = arrivals_and_departures(expected_changes(users(NIGHTS[PREVIOUS]), users(NIGHTS[TONIGHT])))
    coverage = {o["organization_name"]: o for o in truth["coverage"]["organizations"]}
    page, seen = open_dashboard(context, kept_nights)
    expect(page.locator("#delta-heading")).to_be_visible()
    expect(page.locator("#coverage-head")).to_be_visible()
    search = page.get_by_label("Search organizations")
    for term in ("acme", "müller", "s"):
        shown = [o for o in truth["organizations"] if term in o["organization_name"].lower()]
        assert 1 < len(shown) < len(truth["organizations"]), term
        search.fill(term)
        names = [o["organization_name"] for o in shown]
        expect(page.locator("#total-orgs")).to_have_text(f"of {len(shown)} shown organizations")
        assert page.locator("#total-es").inner_text() == f"{sum(o['es_user_count'] for o in shown):,}"
        assert page.locator("#total-m365").inner_text() == f"{sum(o['m365_licensed_user_count'] for o in shown):,}"
        assert page.locator("#total-delta").inner_text() == \
            f"+{sum(arrived[n] for n in names)} / \u2212{sum(left[n] for n in names)}", term
        es = sum(coverage[n]["es_user_count"] for n in names)
        backed = sum(coverage[n]["es_users_backed_up"] for n in names)
        assert page.locator("#total-coverage").inner_text() == \
            ("No email users" if es == 0 else f"{backed:,} of {es:,} protected"), term
    # One match: the counts read in the singular.
    search.fill("grüner")
    expect(page.locator("#total-orgs")).to_have_text("of 1 shown organization")
    assert page.locator("#org-count").inner_text() == f"1 of {len(truth['organizations'])} organizations"
    # Cleared: the API's own totals again, the coverage total included.
    search.fill("")
    totals = truth["coverage"]["totals"]
    expect(page.locator("#total-orgs")).to_have_text(f"{len(truth['organizations'])} organizations")
    assert page.locator("#total-coverage").inner_text() == \
        f"{totals['total_es_users_backed_up']:,} of {totals['total_es_users']:,} protected"
    seen.assert_clean(page)


NARROW = {"width": 390, "height": 844}


def test_at_390_px_every_column_of_the_organization_table_can_be_reached(browser, kept_nights):  # noqa: F811
    ctx = new_context(browser, NARROW)
    try:
        page, seen = open_dashboard(ctx, kept_nights)
        expect(page.locator("#delta-heading")).to_be_visible()
        expect(page.locator("#coverage-head")).to_be_visible()
        # The page itself never scrolls sideways; the table does, inside its panel.
        assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
        headers = page.locator("#org-table thead th")
        assert headers.count() == 5
        for i in range(headers.count()):
            header = headers.nth(i)
            header.scroll_into_view_if_needed()
            box = header.bounding_box()
            assert box and box["width"] > 20, (i, box)
            assert 0 <= box["x"] and box["x"] + box["width"] <= NARROW["width"] + 1, (header.inner_text(), box)
            expect(header).to_be_visible()
        # The last column's cells are readable too, with the name column still beside them.
        first_row = page.locator("#org-rows tr").first
        cell = first_row.locator(".coverage-cell")
        cell.scroll_into_view_if_needed()
        name_box = first_row.locator("th").bounding_box()
        cell_box = cell.bounding_box()
        assert name_box["x"] >= 0 and cell_box["x"] + cell_box["width"] <= NARROW["width"] + 1
        assert name_box["x"] + name_box["width"] <= cell_box["x"] + 1  # the sticky name does not cover it
        save_screenshot(page, "dashboard-390-scrolled.png")
        seen.assert_clean(page)
    finally:
        ctx.close()


def license_diff(before: str, after: str) -> str:
    """What the page says a change added and removed: rule 6's names split on ", ", compared ignoring case."""
    was = {n.lower() for n in before.split(", ") if n}
    now = {n.lower() for n in after.split(", ") if n}
    return " ".join([f"+{n}" for n in after.split(", ") if n and n.lower() not in was]
                    + [f"\u2212{n}" for n in before.split(", ") if n and n.lower() not in now])


def test_changes_say_what_was_added_and_removed_and_count_in_good_english(context, kept_nights):  # noqa: F811
    since_first = expected_changes(users(NIGHTS[FIRST]), users(NIGHTS[TONIGHT]))
    page, seen = open_dashboard(context, kept_nights)
    page.get_by_label("Since the night of").fill(FIRST)
    expect(page.locator("#changes-summary")).to_contain_text(f"from the night of {night_label(FIRST)}")
    diffs = page.evaluate("""() => [...document.querySelectorAll('#changes-rows tr')].map((tr) => [
        tr.querySelector('.change-upn').textContent, tr.querySelector('.change-diff')?.textContent ?? ''])""")
    expected = [[r["user_principal_name"], license_diff(r["licenses_before"] or "", r["licenses_after"] or "")
                 if r["licenses_before"] is not None and r["licenses_after"] is not None else ""]
                for r in since_first]
    assert diffs == expected
    changed = [d for (upn, d), r in zip(diffs, since_first, strict=True) if r["change"] == "licenses_changed"]
    assert changed and all(d for d in changed)  # every "Licenses changed" row says what changed
    assert any("+" in d and "\u2212" in d for d in changed)
    # A change with no license names on one side shows a dash, not an empty "Before:"/"After:".
    blank = [r for r in since_first if "" in (r["licenses_before"], r["licenses_after"])]
    assert blank
    for row in page.locator("#changes-rows tr").all():
        for side in ("before", "after"):
            assert row.locator(f".change-licenses-{side}").inner_text().strip() != ""
    # Counts of one read in the singular: pick an organization with exactly one license change.
    per_org = Counter(r["organization_name"] for r in since_first if r["change"] == "licenses_changed")
    org = next(o for o, n in per_org.items() if n == 1)
    page.get_by_label("Organization", exact=True).select_option(org)
    expect(page.locator("#changes-summary")).to_contain_text(f" in {org} from")
    summary = page.locator("#changes-summary").inner_text()
    assert "1 license change" in summary and "1 licenses" not in summary
    assert not re.search(r"(?<![\d,])1 (changes|license changes)\b", summary), summary
    seen.assert_clean(page)


def test_the_drill_down_explains_backup_badges_and_users_known_only_from_the_backup(context, kept_nights):  # noqa: F811
    truth = tonight_truth()
    org = max(truth["users"], key=lambda o: sum(u["licenses"] == "" for u in truth["users"][o]))
    backup_only = [u["user_principal_name"] for u in truth["users"][org] if u["licenses"] == ""]
    assert backup_only and any(u["has_email_license"] for u in truth["users"][org] if u["licenses"] == "")
    page, seen = open_dashboard(context, kept_nights)
    expect(page.locator("#coverage-head")).to_be_visible()
    org_button(page, org).click()
    expect(page.locator("#users-backup-head")).to_be_visible()
    # Every badge the table can show has its line in the legend.
    legend = page.locator("#backup-legend")
    expect(legend).to_be_visible()
    assert legend.locator("dt").all_inner_texts() == ["Backed up", "Excluded", "Not added", "Not in backup"]
    shown_badges = set(page.locator("#user-rows .user-backup .badge").all_inner_texts())
    assert shown_badges and shown_badges <= set(legend.locator("dt").all_inner_texts())
    assert all(text.strip() for text in legend.locator("dd").all_inner_texts())
    # The users with no license names (source S does not know them) say why, ES badge or not.
    rows = page.evaluate("""() => [...document.querySelectorAll('#user-rows tr')].map((tr) => [
        tr.querySelector('.user-upn').textContent, tr.querySelector('.user-licenses').textContent,
        Boolean(tr.querySelector('.badge--es'))])""")
    explained = [upn for upn, text, _ in rows if "Known only from the backup" in text]
    assert explained == backup_only
    assert any(es for upn, _, es in rows if upn in backup_only)
    seen.assert_clean(page)
