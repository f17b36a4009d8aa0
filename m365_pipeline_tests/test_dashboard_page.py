"""The dashboard page at ``/`` in a real headless Chromium against a real ``m365-serve``.

One browser per module; every test gets a fresh context (en-US, America/New_York) and checks
what a viewer sees against the simulator's ground truth or against data written for the test
(stale, hostile names, zero users). Screenshots of the demo data go to ``test-artifacts/`` and,
when ``M365_TEST_ARTIFACTS`` is set, there too.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from m365_pipeline.api_bodies import (
    CONTENT_TYPES,
    COVERAGE_ORG_FIELDS,
    COVERAGE_USER_FIELDS,
    SORT_FIELDS,
    csv_bytes,
    export_file_name,
    json_bytes,
)
from m365_pipeline.assets.nights import write_changed_users, write_history_files
from m365_pipeline.publishing import VersionWriter, export_dir, iso_z

from .helpers import rule9

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEZONE = "America/New_York"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}
ARTIFACT_DIRS = [Path(__file__).resolve().parent.parent / "test-artifacts"]
if os.environ.get("M365_TEST_ARTIFACTS"):
    ARTIFACT_DIRS.append(Path(os.environ["M365_TEST_ARTIFACTS"]))

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")]

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_QUOTES = "O'Brien \"Quoted\" & Co"
HOSTILE_CJK = "株式会社 テスト"
ZERO_USERS = "Zero Users GmbH"


def save_screenshot(page: Page, name: str, **options: Any) -> None:
    png = page.screenshot(**options)
    for directory in ARTIFACT_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(png)


# -- browser and page fixtures ------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watch:
    """Everything the page said that a viewer should never cause."""
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def csp_violations(self, page: Page) -> list[str]:
        return page.evaluate("window.__cspViolations || []")

    def assert_clean(self, page: Page) -> None:
        assert self.dialogs == [], f"a JavaScript dialog fired: {self.dialogs}"
        assert self.page_errors == [], f"uncaught errors: {self.page_errors}"
        assert self.console_errors == [], f"console errors: {self.console_errors}"
        assert self.csp_violations(page) == [], "CSP violations"


def new_context(browser: Browser, viewport: dict[str, int] = DESKTOP, **options: Any) -> BrowserContext:
    context = browser.new_context(viewport=viewport, locale="en-US", timezone_id=TIMEZONE,
                                  accept_downloads=True, **options)
    context.set_default_timeout(10_000)
    # Injected by the DevTools protocol, so the page's own CSP does not apply to it.
    context.add_init_script("""
        window.__cspViolations = [];
        document.addEventListener('securitypolicyviolation',
            (e) => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));
    """)
    return context


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = new_context(browser)
    yield ctx
    ctx.close()


def watch(page: Page) -> Watch:
    seen = Watch()
    page.on("console", lambda msg: seen.console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: seen.page_errors.append(str(exc)))

    def on_dialog(dialog) -> None:
        seen.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return seen


def open_dashboard(context: BrowserContext, base_url: str) -> tuple[Page, Watch]:
    page = context.new_page()
    seen = watch(page)
    page.goto(base_url + "/")
    expect(page.locator("#content")).to_be_visible()
    return page, seen


# -- reading the page ---------------------------------------------------------------------

def number(text: str) -> int:
    return int(text.replace(",", "").strip())


def table_rows(page: Page) -> list[tuple[str, int, int]]:
    """Visible organization rows: exact name (textContent, spaces kept), ES, M365."""
    rows = page.evaluate("""() => [...document.querySelectorAll('#org-rows tr:not([hidden])')]
        .filter((tr) => tr.querySelector('button.org-link'))
        .map((tr) => [tr.querySelector('button.org-link').textContent,
                      tr.cells[1].textContent, tr.cells[2].textContent])""")
    return [(name, number(es), number(m365)) for name, es, m365 in rows]


def org_button(page: Page, name: str):
    """The row button whose text is exactly ``name`` (accessible names would collapse spaces)."""
    names = page.locator("#org-rows button.org-link").all_text_contents()
    assert names.count(name) == 1, f"{name!r} is not exactly one row: {names}"
    return page.locator("#org-rows button.org-link").nth(names.index(name))


def sort_states(page: Page) -> dict[str, str]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#org-table thead th[data-key]')]
        .map((th) => [th.dataset.key, th.getAttribute('aria-sort')]))""")


def focused_is(page: Page, locator) -> bool:
    return locator.evaluate("(node) => node === document.activeElement")


def changes_shown(page: Page) -> list[dict[str, Any]]:
    """The Changes table's rows, read back into rule 12's fields ("—" is null, or "" when marked as no license
    names; Yes/No the booleans)."""
    rows = page.evaluate("""() => [...document.querySelectorAll('#changes-rows tr')].map((tr) => ({
        organization_name: tr.querySelector('.change-org__name').textContent,
        previous_organization_name: tr.querySelector('.change-org__previous')?.textContent ?? null,
        user_principal_name: tr.querySelector('.change-upn').textContent,
        display_name: tr.querySelector('.change-name').textContent,
        change: tr.dataset.change,
        licenses_before: tr.querySelector('.change-licenses-before.is-no-names') ? ''
            : tr.querySelector('.change-licenses-before').textContent,
        licenses_after: tr.querySelector('.change-licenses-after.is-no-names') ? ''
            : tr.querySelector('.change-licenses-after').textContent,
        has_email_license_before: tr.querySelector('.change-email-before').textContent,
        has_email_license_after: tr.querySelector('.change-email-after').textContent}))""")
    read = {"—": None, "Yes": True, "No": False}
    return [{**row, **{k: read.get(row[k], row[k]) for k in ("licenses_before", "licenses_after",
                                                              "has_email_license_before", "has_email_license_after")}}
            for row in rows]


UTF8_BOM = b"\xef\xbb\xbf"


def download_with_bom(page: Page, link, api: requests.Response) -> bytes:
    """Click a download link of the page (issue 26, item 6): the saved file is a UTF-8 byte-order mark and
    then exactly the API's bytes, under the file name of the API's Content-Disposition (else the link's own
    ``download`` name). Returns the file."""
    assert api.status_code == 200, api.text
    with page.expect_download() as info:
        link.click()
    header = Message()
    header["content-disposition"] = api.headers.get("Content-Disposition", "")
    assert info.value.suggested_filename == (header.get_filename() or link.get_attribute("download"))
    body = Path(info.value.path()).read_bytes()
    assert body[:3] == UTF8_BOM and not api.content.startswith(UTF8_BOM)
    assert body[3:] == api.content
    return body


def dialog_is_open(page: Page) -> bool:
    return page.evaluate("document.getElementById('users-dialog').open")


def expected_as_of(last_collected: str) -> list[str]:
    """Pieces of the en-US local rendering of ``last_collected`` in the context's time zone."""
    moment = datetime.strptime(last_collected, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    local = moment.astimezone(ZoneInfo(TIMEZONE))
    hour = local.hour % 12 or 12
    return [f"{local:%b} {local.day}, {local.year}", f"{hour}:{local:%M}", "AM" if local.hour < 12 else "PM",
            local.tzname()]


def as_of_text(page: Page) -> str:
    return page.locator("#freshness").inner_text().replace("\u202f", " ").replace("\xa0", " ")


# -- data written for a test --------------------------------------------------------------

def write_published(data_dir: Path, organizations: list[dict], users: dict[str, list[dict]],
                    last_collected: str, coverage: dict[str, list[dict]] | None = None,
                    nights: dict[str, dict[str, tuple[int, int]]] | None = None,
                    users_history: list[tuple] | None = None) -> dict[str, Any]:
    """One published version as the export asset writes it: summary, users per org, six exports,
    backup coverage (rule 13) from ``coverage``'s rows per organization when given, and kept nights
    with their users' history (rules 11 and 12, see ``write_nights``) when ``nights`` is given."""
    writer = VersionWriter(export_dir(data_dir))
    totals = {
        "total_organizations": len(organizations),
        "total_es_users": sum(o["es_user_count"] for o in organizations),
        "total_m365_licensed_users": sum(o["m365_licensed_user_count"] for o in organizations),
    }
    summary = {"status": "success", "organizations": organizations, "totals": totals,
               "last_collected": last_collected, "metadata": {"query_time_ms": 1}}
    writer.write_bytes("summary", "summary.json", json_bytes(summary), CONTENT_TYPES["json"])
    for org in organizations:
        rows = users.get(org["organization_name"], [])
        writer.add_organization(org["organization_name"], json_bytes(
            {"status": "success", "organization": org["organization_name"], "users": rows,
             "total_users": len(rows)}))
    records = [{"organization_name": org, **user} for org, rows in users.items() for user in rows]
    for sort in SORT_FIELDS:
        ordered = sorted(records, key=lambda r: (rule9(r[sort]), rule9(r["organization_name"]),
                                                 r["user_principal_name"]))
        text = io.StringIO()
        out = csv.writer(text, lineterminator="\n")
        out.writerow(["organization_name", "user_principal_name", "display_name", "licenses",
                      "has_email_license"])
        for r in ordered:
            out.writerow([r["organization_name"], r["user_principal_name"], r["display_name"], r["licenses"],
                          "true" if r["has_email_license"] else "false"])
        writer.write_bytes(f"export:csv:{sort}", export_file_name(sort, "csv"), text.getvalue().encode(),
                           CONTENT_TYPES["csv"])
        writer.write_bytes(f"export:json:{sort}", export_file_name(sort, "json"), json_bytes(
            {"status": "success", "data": ordered, "total_records": len(ordered),
             "last_collected": last_collected}), CONTENT_TYPES["json"])
    if coverage is not None:
        write_coverage(writer, organizations, coverage, last_collected)
    kept = write_nights(writer, nights, users_history or []) if nights is not None else {}
    writer.commit({"last_collected": last_collected, "totals": totals, **kept})
    return summary


def write_coverage(writer: VersionWriter, organizations: list[dict], coverage: dict[str, list[dict]],
                   last_collected: str) -> None:
    """The coverage files of rule 13, counted here from the given rows."""
    counts = []
    for org in organizations:
        rows = coverage.get(org["organization_name"], [])
        email = [r for r in rows if r["has_email_license"]]
        backed = sum(r["backup_status"] == "active" for r in email)
        counts.append({"organization_name": org["organization_name"], "es_user_count": len(email),
                       "es_users_backed_up": backed, "es_users_not_backed_up": len(email) - backed,
                       "backed_up_without_email_license": sum(r["backup_status"] == "active"
                                                              and not r["has_email_license"] for r in rows)})
        writer.write_coverage(org["organization_name"], "json", json_bytes(
            {"status": "success", "organization": org["organization_name"], "users": rows,
             "total_users": len(rows)}))
        writer.write_coverage(org["organization_name"], "csv", csv_bytes(
            COVERAGE_USER_FIELDS, [tuple(r[f] for f in COVERAGE_USER_FIELDS) for r in rows]))
    totals = {"total_organizations": len(counts),
              **{f"total_{k}": sum(c[field] for c in counts) for k, field in (
                  ("es_users", "es_user_count"), ("es_users_backed_up", "es_users_backed_up"),
                  ("es_users_not_backed_up", "es_users_not_backed_up"),
                  ("backed_up_without_email_license", "backed_up_without_email_license"))}}
    writer.write_coverage(None, "json", json_bytes({"status": "success", "organizations": counts,
                                                     "totals": totals, "last_collected": last_collected}))
    writer.write_coverage(None, "csv", csv_bytes(COVERAGE_ORG_FIELDS,
                                                 [tuple(c[f] for f in COVERAGE_ORG_FIELDS) for c in counts]))


def write_nights(writer: VersionWriter, nights: dict[str, dict[str, tuple[int, int]]],
                 users_history: list[tuple]) -> dict[str, Any]:
    """The history files and what m365-serve answers /history?org and /changes from, written by the
    export's own functions from each night's counts (date -> organization -> (ES, M365 licensed)) and
    ``users_history``: marts.published_users_history rows (organization, UPN, display name, licenses, has
    email license, valid_from, valid_to). Returns the manifest's entries."""
    dates = sorted(nights)
    with duckdb.connect(":memory:") as conn:
        conn.execute("CREATE SCHEMA marts")
        conn.execute("CREATE TABLE marts.nights AS SELECT d::DATE AS collection_date, "
                     "(d || ' 23:00:00+00')::TIMESTAMPTZ AS last_collected FROM unnest($1::VARCHAR[]) AS t(d)", [dates])
        conn.execute("CREATE TABLE marts.org_summary_history (collection_date DATE, organization_name VARCHAR, "
                     "es_user_count BIGINT, m365_licensed_user_count BIGINT)")
        conn.executemany("INSERT INTO marts.org_summary_history VALUES (?, ?, ?, ?)",
                         [(day, org, es, m365) for day in dates for org, (es, m365) in nights[day].items()])
        conn.execute("""CREATE TABLE marts.published_users_history (organization_name VARCHAR,
            user_principal_name VARCHAR, display_name VARCHAR, licenses VARCHAR, has_email_license BOOLEAN,
            valid_from DATE, valid_to DATE)""")
        conn.executemany("INSERT INTO marts.published_users_history VALUES (?, ?, ?, ?, ?, ?, ?)", users_history)
        return {**write_history_files(conn, writer), "changed_users": write_changed_users(conn, writer)}


def hostile_dataset() -> tuple[list[dict], dict[str, list[dict]]]:
    def user(upn: str, name: str, licenses: str, es: bool) -> dict:
        return {"user_principal_name": upn, "display_name": name, "licenses": licenses, "has_email_license": es}

    users = {
        HOSTILE_SCRIPT: [
            user("x@evil.example", "<img src=x onerror=alert(2)>", 'Microsoft 365 Business Premium, <b>Bold</b>',
                 True),
            user("y@evil.example", "\"'; alert(3); //", "Microsoft Copilot", False),
        ],
        HOSTILE_QUOTES: [user(f"u{i}@obrien.example", f"O'Brien User {i}", "Office 365 E3", i % 2 == 0)
                         for i in range(3)],
        HOSTILE_CJK: [user("sato@test.example.jp", "佐藤 花子", "Microsoft 365 E5", True)],
        ZERO_USERS: [],
    }
    organizations = sorted([
        {"organization_name": HOSTILE_SCRIPT, "es_user_count": 1, "m365_licensed_user_count": 2},
        # Counts as the API says them (large, to show the thousands separators).
        {"organization_name": HOSTILE_QUOTES, "es_user_count": 1234, "m365_licensed_user_count": 12345},
        {"organization_name": HOSTILE_CJK, "es_user_count": 1, "m365_licensed_user_count": 1},
        {"organization_name": ZERO_USERS, "es_user_count": 0, "m365_licensed_user_count": 0},
    ], key=lambda o: rule9(o["organization_name"]))
    return organizations, users


def hostile_coverage(users: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Coverage rows of the hostile dataset: its users (one email user not backed up) and a shared mailbox
    with markup in its name, backed up without an email license."""
    statuses = iter(["active", "none", "excluded", "active", "available", "active", "active"])
    coverage = {org: [{"user_principal_name": u["user_principal_name"], "display_name": u["display_name"],
                       "m365_licensed": True, "has_email_license": u["has_email_license"],
                       "backup_status": next(statuses)} for u in rows] for org, rows in users.items()}
    coverage[HOSTILE_SCRIPT].append({"user_principal_name": "shared@evil.example",
                                     "display_name": "<img src=y onerror=alert(4)>", "m365_licensed": False,
                                     "has_email_license": False, "backup_status": "active"})
    coverage[HOSTILE_SCRIPT].sort(key=lambda r: rule9(r["user_principal_name"]))
    return coverage


# -- the demo data -------------------------------------------------------------------------

def test_summary_table_matches_the_api_freshness_and_no_console_errors(browser, session_server, published):
    truth = published.truth
    api = requests.get(session_server.base_url + "/api/m365/summary", timeout=10).json()
    for viewport, suffix in ((DESKTOP, "desktop"), (PHONE, "phone")):
        ctx = new_context(browser, viewport)
        try:
            page, seen = open_dashboard(ctx, session_server.base_url)
            expected = [(o["organization_name"], o["es_user_count"], o["m365_licensed_user_count"])
                        for o in truth["organizations"]]
            assert table_rows(page) == expected  # every organization, API order, exact numbers
            totals = truth["totals"]
            assert number(page.locator("#total-es").inner_text()) == totals["total_es_users"]
            assert number(page.locator("#total-m365").inner_text()) == totals["total_m365_licensed_users"]
            assert f"{totals['total_organizations']} organizations" in page.locator("#totals-row").inner_text()
            assert number(page.locator("#kpi-orgs").inner_text()) == totals["total_organizations"]
            assert page.locator("#org-count").inner_text() == \
                f"{len(expected)} of {len(expected)} organizations"
            # Freshness in the viewer's zone; fresh data has no warning.
            text = as_of_text(page)
            assert text.startswith("Data as of ")
            for piece in expected_as_of(api["last_collected"]):
                assert piece in text, (piece, text)
            assert page.locator("#last-collected").get_attribute("datetime") == api["last_collected"]
            expect(page.locator("#stale-banner")).to_be_hidden()
            expect(page.get_by_role("alert")).to_have_count(0)
            # Nothing on the page is wider than the screen (the phone case is the one that matters).
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            save_screenshot(page, f"dashboard-{suffix}.png")

            org = max(truth["organizations"], key=lambda o: o["m365_licensed_user_count"])
            org_button(page, org["organization_name"]).click()
            expect(page.locator("#users-table")).to_be_visible()
            box = page.locator("#users-dialog").bounding_box()
            assert box["x"] >= 0 and box["y"] >= 0
            assert box["x"] + box["width"] <= viewport["width"] and box["y"] + box["height"] <= viewport["height"]
            save_screenshot(page, f"dashboard-users-{suffix}.png")
            page.keyboard.press("Escape")
            seen.assert_clean(page)
        finally:
            ctx.close()

    dark = new_context(browser, DESKTOP, color_scheme="dark")
    try:
        page, seen = open_dashboard(dark, session_server.base_url)
        save_screenshot(page, "dashboard-dark-desktop.png")
        seen.assert_clean(page)
    finally:
        dark.close()


def test_sorting_by_each_column_toggles_and_matches_python_order(context, session_server, published):
    page, seen = open_dashboard(context, session_server.base_url)
    orgs = [(o["organization_name"], o["es_user_count"], o["m365_licensed_user_count"])
            for o in published.truth["organizations"]]
    by_name = sorted(orgs, key=lambda o: rule9(o[0]))
    assert table_rows(page) == by_name
    assert sort_states(page) == {"organization_name": "ascending", "es_user_count": "none",
                                 "m365_licensed_user_count": "none"}

    header = {key: page.locator(f'#org-table thead th[data-key="{key}"] button')
              for key in ("organization_name", "es_user_count", "m365_licensed_user_count")}
    header["organization_name"].click()
    assert sort_states(page)["organization_name"] == "descending"
    assert table_rows(page) == by_name[::-1]
    header["organization_name"].click()
    assert table_rows(page) == by_name

    for column, key in ((1, "es_user_count"), (2, "m365_licensed_user_count")):
        header[key].click()  # counts start largest first; ties stay A to Z
        assert sort_states(page) == {k: ("descending" if k == key else "none") for k in header}
        assert table_rows(page) == sorted(orgs, key=lambda o: (-o[column], rule9(o[0])))
        header[key].press("Enter")  # the header buttons work from the keyboard too
        assert sort_states(page)[key] == "ascending"
        assert table_rows(page) == sorted(orgs, key=lambda o: (o[column], rule9(o[0])))
    seen.assert_clean(page)


def test_search_filters_organizations_as_you_type(context, session_server, published):
    page, seen = open_dashboard(context, session_server.base_url)
    names = [o["organization_name"] for o in published.truth["organizations"]]
    search = page.get_by_label("Search organizations")
    typed = ""
    for char in "ACME \"w":
        search.press_sequentially(char)
        typed += char
        wanted = [n for n in names if typed.lower() in n.lower()] if typed.strip() else names
        assert [row[0] for row in table_rows(page)] == wanted, typed
        assert page.locator("#org-count").inner_text() == f"{len(wanted)} of {len(names)} organizations"
    assert len(wanted) == 2  # 'ACME "WIDGETS"…' and 'Acme "Widgets"…': case-insensitive
    # With a filter on, the Total row sums what is shown and says so.
    shown = [o for o in published.truth["organizations"] if o["organization_name"] in wanted]
    assert number(page.locator("#total-es").inner_text()) == sum(o["es_user_count"] for o in shown)
    assert number(page.locator("#total-m365").inner_text()) == sum(o["m365_licensed_user_count"] for o in shown)
    assert " ".join(page.locator("#totals-row th").inner_text().split()) == "Total of 2 shown organizations"

    search.fill("ромашка")  # non-Latin, lower case against 'Ромашка'
    assert [row[0] for row in table_rows(page)] == [n for n in names if "ромашка" in n.lower()] != []
    search.fill("no such organization")
    assert table_rows(page) == []
    expect(page.locator("#org-rows")).to_contain_text("No organizations match")
    assert page.locator("#org-count").inner_text() == f"0 of {len(names)} organizations"
    assert number(page.locator("#total-m365").inner_text()) == 0
    search.fill("")
    assert len(table_rows(page)) == len(names)
    # Unfiltered, the Total row is the API's totals of all organizations.
    assert number(page.locator("#total-m365").inner_text()) == published.truth["totals"]["total_m365_licensed_users"]
    assert " ".join(page.locator("#totals-row th").inner_text().split()) == f"Total {len(names)} organizations"
    seen.assert_clean(page)


def test_drill_down_lists_exactly_the_organizations_users_with_keyboard_focus(context, session_server,
                                                                               published):
    page, seen = open_dashboard(context, session_server.base_url)
    truth = published.truth
    org = max(truth["organizations"], key=lambda o: o["m365_licensed_user_count"])
    name, expected_users = org["organization_name"], truth["users"][org["organization_name"]]
    assert 0 < org["es_user_count"] < len(expected_users)  # both kinds of rows are shown

    button = org_button(page, name)
    button.focus()
    page.keyboard.press("Enter")  # a real <button>: the keyboard opens it
    dialog = page.locator("#users-dialog")
    expect(dialog).to_be_visible()
    assert dialog.get_attribute("aria-labelledby") == "users-title"
    assert page.locator("#users-title").text_content() == name
    assert page.evaluate("document.getElementById('users-dialog').contains(document.activeElement)")
    expect(page.locator("#users-table")).to_be_visible()

    rows = page.evaluate("""() => [...document.querySelectorAll('#user-rows tr')].map((tr) => ({
        upn: tr.querySelector('.user-upn').textContent, name: tr.querySelector('.user-name').textContent,
        licenses: tr.querySelector('.user-licenses').firstChild.textContent,
            es: !!tr.querySelector('.badge--es')}))""")
    assert [r["upn"] for r in rows] == [u["user_principal_name"] for u in expected_users]
    assert rows == [{"upn": u["user_principal_name"], "name": u["display_name"], "licenses": u["licenses"] or "—",
                     "es": u["has_email_license"]} for u in expected_users]
    count = page.locator("#users-count").inner_text()
    assert f"{len(expected_users)} users" in count and f"{org['es_user_count']} with an email (ES) license" in count

    # The dialog's own search narrows its rows.
    needle = expected_users[0]["user_principal_name"][:6]
    page.get_by_label("Search users").fill(needle)
    wanted = [u["user_principal_name"] for u in expected_users
              if any(needle in str(u[k]).lower() for k in ("user_principal_name", "display_name", "licenses"))]
    assert page.locator("#user-rows .user-upn").all_text_contents() == wanted
    assert f"{len(wanted)} of {len(expected_users)} users" in page.locator("#users-count").inner_text()
    # Escape in a search box with text clears it first (the browser's own behaviour), then closes.
    page.keyboard.press("Escape")
    assert dialog_is_open(page) and page.get_by_label("Search users").input_value() == ""
    assert len(page.locator("#user-rows .user-upn").all_text_contents()) == len(expected_users)

    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert not dialog_is_open(page)
    assert focused_is(page, button), "focus goes back to the organization's button"

    # An organization with no published users says so; the close button also returns focus.
    empty = next(o["organization_name"] for o in truth["organizations"] if o["m365_licensed_user_count"] == 0)
    empty_button = org_button(page, empty)
    empty_button.click()
    expect(page.locator("#users-empty")).to_be_visible()
    expect(page.locator("#users-empty")).to_contain_text("No licensed users")
    assert page.locator("#users-title").text_content() == empty
    page.get_by_role("button", name="Close").click()
    assert not dialog_is_open(page)
    assert focused_is(page, empty_button)
    seen.assert_clean(page)


def test_export_button_downloads_the_csv_export_with_a_byte_order_mark_for_excel(context, session_server, published):
    """Issue 26, item 6: the page's download is U+FEFF + the API's documented bytes (which have none), so
    Excel reads it as UTF-8 and keeps "Müller & Söhne" intact."""
    page, seen = open_dashboard(context, session_server.base_url)
    link = page.get_by_role("link", name="Export to CSV")
    expect(link).to_be_visible()
    api = requests.get(session_server.base_url + "/api/m365/export", params={"format": "csv"}, timeout=10)
    assert re.fullmatch(r'attachment; filename="m365-users-\d{4}-\d{2}-\d{2}\.csv"', api.headers["Content-Disposition"])
    body = download_with_bom(page, link, api)
    text = body.decode("utf-8-sig")
    assert text.startswith("organization_name,user_principal_name,display_name,licenses,has_email_license")
    mueller = next(o["organization_name"] for o in published.truth["organizations"]
                   if "Müller" in o["organization_name"])
    assert mueller.startswith("Müller & Söhne") and f"{mueller}," in text.replace('"', "")
    seen.assert_clean(page)


# -- data written for the test: stale, hostile names, zero users ----------------------------

def test_stale_data_warns_and_hostile_names_render_as_text(context, start_server, tmp_path):
    data_dir = tmp_path / "data"
    organizations, users = hostile_dataset()
    last_collected = iso_z(datetime.now(UTC) - timedelta(days=3, hours=2))
    write_published(data_dir, organizations, users, last_collected, hostile_coverage(users))
    server = start_server(data_dir)

    page, seen = open_dashboard(context, server.base_url)
    assert table_rows(page) == [(o["organization_name"], o["es_user_count"], o["m365_licensed_user_count"])
                                for o in organizations]
    for name in (HOSTILE_SCRIPT, HOSTILE_QUOTES, HOSTILE_CJK):
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    assert page.locator("#org-rows script, #org-rows img, #org-rows b").count() == 0
    row = org_button(page, HOSTILE_QUOTES).locator("xpath=ancestor::tr")
    assert row.locator("td").all_inner_texts()[:2] == ["1,234", "12,345"]  # thousands separators
    assert page.locator("#total-m365").inner_text() == "12,348"

    banner = page.get_by_role("alert")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("out of date")
    expect(banner).to_contain_text("3 days ago")
    text = as_of_text(page)
    for piece in expected_as_of(last_collected):
        assert piece in text, (piece, text)
    save_screenshot(page, "dashboard-stale-hostile-desktop.png")

    org_button(page, HOSTILE_SCRIPT).click()
    expect(page.locator("#users-table")).to_be_visible()
    assert page.locator("#users-title").text_content() == HOSTILE_SCRIPT
    assert page.locator("#user-rows .user-name").all_text_contents() == \
        ["<img src=x onerror=alert(2)>", "\"'; alert(3); //"]
    assert page.locator("#user-rows .user-licenses").first.text_content() == \
        "Microsoft 365 Business Premium, <b>Bold</b>"
    assert page.locator("#unbilled-list .unbilled__name").all_text_contents() == ["<img src=y onerror=alert(4)>"]
    assert page.locator("#users-dialog img, #users-dialog b").count() == 0
    expect(page.get_by_label("Search users")).to_be_visible()
    save_screenshot(page, "dashboard-hostile-users-desktop.png")
    page.keyboard.press("Escape")

    org_button(page, ZERO_USERS).click()
    expect(page.locator("#users-empty")).to_contain_text("No licensed users")
    expect(page.get_by_label("Search users")).to_be_hidden()  # an organization with no users: nothing to search
    page.keyboard.press("Escape")
    page.wait_for_timeout(200)  # give a late script the chance to fire an alert
    assert seen.dialogs == []
    seen.assert_clean(page)


def test_nothing_published_yet_shows_a_friendly_message(context, start_server, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    server = start_server(empty_dir)
    page = context.new_page()
    seen = watch(page)
    page.goto(server.base_url + "/")
    state = page.locator("#state-empty")
    expect(state).to_be_visible()
    expect(state).to_contain_text("No data published yet")
    expect(state).to_contain_text("make demo")
    expect(page.locator("#content")).to_be_hidden()
    expect(page.get_by_role("link", name="Export to CSV")).to_be_hidden()
    expect(page.locator("#state-error")).to_be_hidden()
    save_screenshot(page, "dashboard-nothing-published.png")
    # The browser logs the 404 itself; nothing else may go wrong.
    assert all("404" in message for message in seen.console_errors), seen.console_errors
    assert seen.page_errors == [] and seen.dialogs == []


def test_api_unreachable_shows_an_error_and_retry_recovers(context, session_server, published):
    page = context.new_page()
    seen = watch(page)
    page.route("**/api/m365/summary", lambda route: route.abort("connectionrefused"))
    page.goto(session_server.base_url + "/")
    error = page.locator("#state-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Cannot reach the dashboard API")
    expect(error).to_contain_text("Network error")
    retry = page.get_by_role("button", name="Retry")
    expect(retry).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()
    save_screenshot(page, "dashboard-unreachable.png")

    page.unroute("**/api/m365/summary")
    retry.click()
    expect(page.locator("#content")).to_be_visible()
    expect(error).to_be_hidden()
    assert len(table_rows(page)) == len(published.truth["organizations"])
    assert seen.page_errors == [] and seen.dialogs == []


# -- backup coverage (docs/RULES.md, rule 13) ------------------------------------------------

def coverage_cells(page: Page) -> dict[str, tuple[str, bool]]:
    """Visible organization rows: exact name -> (coverage text, marked as short)."""
    rows = page.evaluate("""() => [...document.querySelectorAll('#org-rows tr:not([hidden])')]
        .filter((tr) => tr.querySelector('button.org-link'))
        .map((tr) => [tr.querySelector('button.org-link').textContent,
                      tr.querySelector('.coverage-cell').textContent,
                      tr.querySelector('.coverage-cell').classList.contains('is-short')])""")
    return {name: (text, short) for name, text, short in rows}


def expected_coverage_text(es: int, backed_up: int) -> str:
    return "No email users" if es == 0 else f"{backed_up:,} of {es:,} protected"


def test_coverage_column_shows_protected_email_users_and_marks_shortfalls(context, session_server, published):
    page, seen = open_dashboard(context, session_server.base_url)
    expect(page.locator("#coverage-head")).to_be_visible()
    truth = published.truth["coverage"]
    expect(page.locator("#org-rows .coverage-cell")).to_have_count(len(truth["organizations"]))
    assert coverage_cells(page) == {
        o["organization_name"]: (expected_coverage_text(o["es_user_count"], o["es_users_backed_up"]),
                                 o["es_users_not_backed_up"] > 0)
        for o in truth["organizations"]}
    assert any(short for _, short in coverage_cells(page).values())  # the demo data has real gaps
    totals = truth["totals"]
    total = page.locator("#total-coverage")
    assert total.inner_text() == expected_coverage_text(totals["total_es_users"], totals["total_es_users_backed_up"])
    assert "is-short" in total.get_attribute("class")
    # Sorting and searching keep each row's own coverage cell.
    page.locator('#org-table thead th[data-key="es_user_count"] button').click()
    page.get_by_label("Search organizations").fill("acme")
    shown = coverage_cells(page)
    assert shown and all(shown[o["organization_name"]][0] == expected_coverage_text(
        o["es_user_count"], o["es_users_backed_up"]) for o in truth["organizations"] if o["organization_name"] in shown)
    seen.assert_clean(page)


def test_drill_down_shows_backup_status_and_mailboxes_without_email_license_and_downloads_csv(
        context, session_server, published):
    page, seen = open_dashboard(context, session_server.base_url)
    expect(page.locator("#coverage-head")).to_be_visible()
    truth = published.truth["coverage"]
    org = max(truth["organizations"],
              key=lambda o: (o["backed_up_without_email_license"] > 0, o["es_users_not_backed_up"] > 0,
                             o["es_user_count"]))
    name = org["organization_name"]
    rows = truth["users"][name]
    assert org["backed_up_without_email_license"] > 0 and org["es_users_not_backed_up"] > 0
    org_button(page, name).click()
    expect(page.locator("#users-backup-head")).to_be_visible()
    expect(page.locator("#unbilled")).to_be_visible()
    published_rows = [r for r in rows if r["m365_licensed"]]
    expect(page.locator("#user-rows .user-backup")).to_have_count(len(published_rows))
    found = page.evaluate("""() => [...document.querySelectorAll('#user-rows tr')].map((tr) => [
        tr.querySelector('.user-upn').textContent, tr.querySelector('.user-backup .badge').dataset.status])""")
    assert found == [[r["user_principal_name"], r["backup_status"]] for r in published_rows]
    unbilled = [r for r in rows if r["backup_status"] == "active" and not r["has_email_license"]]
    assert page.locator("#unbilled-list .unbilled__upn").all_text_contents() == \
        [r["user_principal_name"] for r in unbilled]
    assert page.locator("#unbilled-list .unbilled__name").all_text_contents() == [r["display_name"] for r in unbilled]
    note = page.locator("#coverage-note")
    assert note.inner_text() == "Backup: " + expected_coverage_text(org["es_user_count"], org["es_users_backed_up"])
    assert "is-short" in note.get_attribute("class")

    api = requests.get(session_server.base_url + "/api/m365/coverage", params={"org": name, "format": "csv"},
                       timeout=10)
    body = download_with_bom(page, page.get_by_role("link", name="Download coverage CSV"), api)[3:]
    assert body.startswith(",".join(COVERAGE_USER_FIELDS).encode() + b"\r\n")
    assert len(body.decode().splitlines()) == len(rows) + 1
    save_screenshot(page, "dashboard-coverage-drill-down-desktop.png")
    page.keyboard.press("Escape")
    seen.assert_clean(page)


def test_without_coverage_published_the_page_shows_no_coverage_and_still_works(context, start_server, tmp_path):
    data_dir = tmp_path / "data"
    organizations, users = hostile_dataset()
    write_published(data_dir, organizations, users, iso_z(datetime.now(UTC)))  # source B not configured
    server = start_server(data_dir)
    page = context.new_page()
    seen = watch(page)
    page.goto(server.base_url + "/")
    expect(page.locator("#content")).to_be_visible()
    page.wait_for_load_state("networkidle")
    expect(page.locator("#coverage-head")).to_be_hidden()
    assert page.locator("#org-rows .coverage-cell").count() == 0
    org_button(page, HOSTILE_QUOTES).click()
    expect(page.locator("#users-table")).to_be_visible()
    expect(page.locator("#coverage-csv")).to_be_hidden()
    expect(page.locator("#unbilled")).to_be_hidden()
    assert page.locator("#user-rows .user-backup").count() == 0
    # The browser logs the coverage 404 itself; nothing else may go wrong.
    assert all("404" in message for message in seen.console_errors), seen.console_errors
    assert seen.page_errors == [] and seen.dialogs == [] and seen.csp_violations(page) == []


# -- nights: the trend chart and the Changes view (docs/RULES.md, rules 11 and 12) ----------------
# The real nights are in test_dashboard_nights.py; here, data written for the test.

def change(org: str, upn: str, name: str, kind: str, before: tuple[str, bool] | None,
           after: tuple[str, bool] | None, previous: str | None = None) -> dict[str, Any]:
    """One rule-12 row, fields in the API's order."""
    return {"organization_name": org, "previous_organization_name": previous, "user_principal_name": upn,
            "display_name": name, "change": kind, "licenses_before": before and before[0],
            "licenses_after": after and after[0], "has_email_license_before": before and before[1],
            "has_email_license_after": after and after[1]}


def test_markup_in_names_renders_as_text_in_the_trend_chart_and_the_changes_view(context, start_server, tmp_path):
    data_dir = tmp_path / "data"
    organizations, users = hostile_dataset()
    tonight = {o["organization_name"]: (o["es_user_count"], o["m365_licensed_user_count"]) for o in organizations}
    first, second = "2026-03-01", "2026-03-02"
    nights = {first: {HOSTILE_SCRIPT: (0, 1), HOSTILE_QUOTES: (1235, 12346)}, second: tonight}
    rows = sorted([
        change(HOSTILE_SCRIPT, "x@evil.example", "<img src=x onerror=alert(2)>", "moved",
               ("<b>Bold</b>", False), ("Microsoft 365 Business Premium, <b>Bold</b>", True), previous=HOSTILE_QUOTES),
        change(HOSTILE_SCRIPT, "gone@evil.example", "<script>alert(5)</script>", "removed", ("Office 365 E3", True),
               None),
        change(HOSTILE_CJK, "sato@test.example.jp", "佐藤 花子", "added", None, ("Microsoft 365 E5", True)),
        # Known only from the backup (rule 6): no license names on either night.
        change(HOSTILE_SCRIPT, "backup.only@evil.example", "<u>Backup</u>", "moved", ("", True), ("", True),
               previous=HOSTILE_QUOTES),
    ], key=lambda r: (rule9(r["organization_name"]), rule9(r["user_principal_name"])))
    # The history rows those changes come from: each user's state before (first night) and after (second).
    history = [
        ("<b>Bold</b>", False, HOSTILE_QUOTES, first, second), ("Microsoft 365 Business Premium, <b>Bold</b>", True,
                                                                 HOSTILE_SCRIPT, second, None)]
    users_history = [(org, "x@evil.example", "<img src=x onerror=alert(2)>", lic, es, start, end)
                     for lic, es, org, start, end in history]
    users_history += [(HOSTILE_SCRIPT, "gone@evil.example", "<script>alert(5)</script>", "Office 365 E3", True, first,
                       second),
                      (HOSTILE_CJK, "sato@test.example.jp", "佐藤 花子", "Microsoft 365 E5", True, second, None),
                      (HOSTILE_SCRIPT, "kept@evil.example", "<i>Kept</i>", "Office 365 E3", True, first, None),
                      (HOSTILE_QUOTES, "backup.only@evil.example", "<u>Backup</u>", "", True, first, second),
                      (HOSTILE_SCRIPT, "backup.only@evil.example", "<u>Backup</u>", "", True, second, None)]
    write_published(data_dir, organizations, users, iso_z(datetime.now(UTC)), hostile_coverage(users), nights=nights,
                    users_history=users_history)
    server = start_server(data_dir)
    page, seen = open_dashboard(context, server.base_url)

    expect(page.locator("#changes-table")).to_be_visible()
    assert changes_shown(page) == rows
    # Issue 26: the moved user with no license names reads "Before: —" and "After: —", not blanks.
    moved_blank = page.locator("#changes-rows tr", has=page.get_by_text("backup.only@evil.example", exact=True))
    assert moved_blank.locator(".change-line").all_inner_texts() == ["Before: —", "After: —"]
    assert moved_blank.locator(".change-diff").count() == 0
    # The moved user whose licenses grew says what was added.
    moved = page.locator("#changes-rows tr", has=page.get_by_text("x@evil.example", exact=True))
    assert moved.locator(".change-diff").inner_text() == "+Microsoft 365 Business Premium"
    assert page.locator("#changes-org option").all_text_contents() == \
        ["All organizations"] + sorted(tonight, key=rule9)
    page.get_by_label("Organization", exact=True).select_option(HOSTILE_SCRIPT)  # the exact name, markup and all
    expect(page.locator("#changes-rows tr")).to_have_count(3)
    assert page.locator("#changes-rows .change-upn").all_text_contents() == \
        ["backup.only@evil.example", "gone@evil.example", "x@evil.example"]
    expect(page.locator("#changes-summary")).to_contain_text(f"in {HOSTILE_SCRIPT} from the night of Mar 1, 2026")
    assert page.locator("#changes img, #changes script, #changes b, #changes u").count() == 0

    org_button(page, HOSTILE_SCRIPT).click()
    expect(page.locator("#trend-chart svg")).to_be_visible()
    assert page.locator("#trend-chart svg > title").text_content() == f"{HOSTILE_SCRIPT}: users on 2 kept nights"
    assert page.locator("#trend-caption").text_content() == \
        f"{HOSTILE_SCRIPT}: ES and M365 licensed users on each kept night"
    assert [row.split("\t") for row in page.locator("#trend-rows tr").all_inner_texts()] == \
        [["Mar 1, 2026", "0", "1"], ["Mar 2, 2026", "1", "2"]]
    assert page.locator("#users-dialog img, #users-dialog script, #trend-chart foreignObject").count() == 0
    save_screenshot(page, "dashboard-trend-hostile-desktop.png")
    page.keyboard.press("Escape")
    page.wait_for_timeout(200)  # give a late script the chance to fire an alert
    seen.assert_clean(page)


def test_with_fewer_than_two_kept_nights_the_trend_and_changes_views_say_why(context, start_server, tmp_path,
                                                                             session_server, published):
    # No night kept (a version written without nights): nothing to chart or compare, and no request fails.
    data_dir = tmp_path / "data"
    organizations, users = hostile_dataset()
    write_published(data_dir, organizations, users, iso_z(datetime.now(UTC)), hostile_coverage(users))
    page, seen = open_dashboard(context, start_server(data_dir).base_url)
    message = page.locator("#changes-message")
    expect(message).to_have_text("No night is kept yet: changes appear once two nights have been published.")
    expect(page.get_by_label("Since the night of")).to_be_hidden()
    expect(page.get_by_role("link", name="Download changes CSV")).to_be_hidden()
    org_button(page, HOSTILE_QUOTES).click()
    expect(page.locator("#trend-note")).to_have_text(
        "No kept night has this organization yet: its trend starts with its first published night.")
    assert page.locator("#trend-chart svg").count() == 0 and page.locator("#trend-rows tr").count() == 0
    expect(page.locator("#trend-legend")).to_be_hidden()
    page.keyboard.press("Escape")
    # The Billing view (issue 23): no kept month, said so, and nothing asked of the billing API.
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "/billing" in request.url else None)
    page.get_by_role("tab", name="Billing months").click()
    expect(page.locator("#billing-message")).to_have_text(
        "No night is kept yet: a billing month appears with its first published night.")
    assert asked == []
    expect(page.get_by_label("Month", exact=True)).to_be_hidden()
    expect(page.get_by_role("link", name="Download month CSV")).to_be_hidden()
    # The views are tabs: arrow keys move between them, the chosen one alone is shown.
    billing_tab = page.get_by_role("tab", name="Billing months")
    assert billing_tab.get_attribute("aria-selected") == "true"
    expect(page.locator("#org-table")).to_be_hidden()
    billing_tab.press("ArrowLeft")
    usage_tab = page.get_by_role("tab", name="Usage tonight")
    assert usage_tab.get_attribute("aria-selected") == "true" and focused_is(page, usage_tab)
    expect(page.locator("#org-table")).to_be_visible()
    expect(page.locator("#billing")).to_be_hidden()
    seen.assert_clean(page)

    # One night kept (the shared published run): its numbers as one point, and no changes yet.
    night = requests.get(session_server.base_url + "/api/m365/history", timeout=10).json()["history"]
    assert len(night) == 1
    day = datetime.strptime(night[0]["date"], "%Y-%m-%d")
    label = f"{day:%b} {day.day}, {day.year}"
    page, seen = open_dashboard(context, session_server.base_url)
    expect(page.locator("#changes-message")).to_have_text(
        f"Only one night is kept so far ({label}): changes appear after the next published night.")
    org = max(published.truth["organizations"], key=lambda o: o["m365_licensed_user_count"])
    org_button(page, org["organization_name"]).click()
    expect(page.locator("#trend-note")).to_contain_text(f"Only one night is kept for this organization so far "
                                                         f"({label})")
    assert page.locator("#trend-rows tr").all_inner_texts() == \
        [f"{label}\t{org['es_user_count']:,}\t{org['m365_licensed_user_count']:,}"]
    assert page.locator("#trend-chart circle").count() == 2 and page.locator("#trend-chart polyline").count() == 0
    page.keyboard.press("Escape")
    seen.assert_clean(page)
