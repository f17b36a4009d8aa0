"""Rules 11 and 12 on hand-written vendor rows: every change kind, the one-night-per-date rule, and a
night recorded out of date order, through the publish step (which records the night) and the
stored macros analysts use. Expected rows are written out by hand from docs/RULES.md."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from m365_pipeline.api_bodies import CHANGE_FIELDS, CHANGED_USERS_FILE, changes_body
from m365_pipeline.history_api import BadDate, night_a, parse_date
from m365_pipeline.publishing import VersionWriter, export_dir
from m365_pipeline.server.app import Dashboard

from .contract_fixtures import RawBuilder, build_and_publish
from .helpers import dicts, query

E3, APPS, VISIO = "Microsoft 365 E3", "Microsoft 365 Apps for business", "Microsoft Visio Plan 2"
CHANGES_SQL = "SELECT * FROM marts.changes_between($1::DATE, $2::DATE)"


def night(path: Path, when: datetime, *, second: bool) -> RawBuilder:
    """Acme and Beta; on the second night every change kind of rule 12 happens once."""
    b = RawBuilder(path, collected_at=when)
    b.org("oa", "Acme").tenant("oa", "oa-t0", "acme.com")
    b.org("ob", "Beta").tenant("ob", "ob-t0", "beta.com")
    b.person("keep@acme.com", E3, display_name="Keep")
    b.person("rename@acme.com", E3, display_name="New Name" if second else "Old Name")  # not a change
    b.person("lose@acme.com", APPS if second else E3, display_name="Lose")
    b.person("gain@acme.com", *([E3, APPS] if second else [APPS]), display_name="Gain")
    b.person("lic@acme.com", *([E3, VISIO] if second else [E3]), display_name="Lic")
    b.person("mover@freelance.example", E3, display_name="Mover")
    # The mailbox decides the organization (rule 3): Acme's on night 1, Beta's on night 2 (a domain
    # of its own, so neither organization comes to own acme.com or beta.com twice).
    b.account("ob" if second else "oa", "ob-t0" if second else "oa-t0", "mover@freelance.example")
    if not second:
        b.person("gone@beta.com", E3, display_name="Gone <b>")
    else:
        b.person("new@beta.com", APPS, display_name="New, \"Hire\"")
    return b


def at(day: int, hh: int = 23, mm: int = 0) -> datetime:
    return datetime(2026, 1, day, hh, mm, tzinfo=UTC)


EXPECTED = [
    {"organization_name": "Acme", "previous_organization_name": None, "user_principal_name": "gain@acme.com",
     "display_name": "Gain", "change": "email_gained", "licenses_before": APPS,
     "licenses_after": f"{APPS}, {E3}", "has_email_license_before": False, "has_email_license_after": True},
    {"organization_name": "Acme", "previous_organization_name": None, "user_principal_name": "lic@acme.com",
     "display_name": "Lic", "change": "licenses_changed", "licenses_before": E3,
     "licenses_after": f"{E3}, {VISIO}", "has_email_license_before": True, "has_email_license_after": True},
    {"organization_name": "Acme", "previous_organization_name": None, "user_principal_name": "lose@acme.com",
     "display_name": "Lose", "change": "email_lost", "licenses_before": E3, "licenses_after": APPS,
     "has_email_license_before": True, "has_email_license_after": False},
    {"organization_name": "Beta", "previous_organization_name": None, "user_principal_name": "gone@beta.com",
     "display_name": "Gone <b>", "change": "removed", "licenses_before": E3, "licenses_after": None,
     "has_email_license_before": True, "has_email_license_after": None},
    {"organization_name": "Beta", "previous_organization_name": "Acme",
     "user_principal_name": "mover@freelance.example", "display_name": "Mover", "change": "moved",
     "licenses_before": E3, "licenses_after": E3,
     "has_email_license_before": True, "has_email_license_after": True},
    {"organization_name": "Beta", "previous_organization_name": None, "user_principal_name": "new@beta.com",
     "display_name": "New, \"Hire\"", "change": "added", "licenses_before": None, "licenses_after": APPS,
     "has_email_license_before": None, "has_email_license_after": False},
]


@pytest.fixture
def two_nights(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "m365.duckdb"
    build_and_publish(night(path, at(20), second=False))
    build_and_publish(night(path, at(21), second=True))
    return path


def test_rule12_every_change_kind_once_in_rule_order_and_a_rename_alone_is_none(two_nights):
    assert dicts(two_nights, CHANGES_SQL, ["2026-01-20", "2026-01-21"]) == EXPECTED


def test_rule12_changes_of_the_published_version_are_the_same_for_the_server(two_nights):
    def changes(since: str) -> dict:
        answer = Dashboard(two_nights.parent).respond("GET", "/api/m365/changes", f"since={since}", {})
        assert answer.status == 200, answer.body
        return json.loads(answer.body)

    assert changes("2026-01-20") == {"status": "success", "from": "2026-01-20T23:00:00Z",
                                     "to": "2026-01-21T23:00:00Z", "changes": EXPECTED,
                                     "total_changes": len(EXPECTED)}
    assert changes("2026-01-21")["changes"] == []


def test_rule11_published_users_on_a_date_are_that_nights(two_nights):
    first = {r["user_principal_name"]: (r["organization_name"], r["display_name"])
             for r in dicts(two_nights, "SELECT * FROM marts.published_users_on('2026-01-20')")}
    assert first["mover@freelance.example"] == ("Acme", "Mover") and first["rename@acme.com"] == ("Acme", "Old Name")
    assert "new@beta.com" not in first and "gone@beta.com" in first
    # A date between or after nights reads the latest night on or before it.
    later = dicts(two_nights, "SELECT * FROM marts.published_users_on('2026-02-01')")
    assert {r["user_principal_name"] for r in later} == {
        "keep@acme.com", "rename@acme.com", "lose@acme.com", "gain@acme.com", "lic@acme.com", "mover@freelance.example",
        "new@beta.com"}


def test_rule11_a_rerun_on_the_same_date_replaces_that_nights_users_and_changes(two_nights):
    rerun = night(two_nights, at(21, 23, 40), second=False)  # the 21st again, now like the 20th
    build_and_publish(rerun)
    assert [d for (d,) in query(two_nights, "SELECT strftime(collection_date, '%Y-%m-%d') FROM marts.nights "
                                            "ORDER BY 1")] == ["2026-01-20", "2026-01-21"]
    assert dicts(two_nights, CHANGES_SQL, ["2026-01-20", "2026-01-21"]) == []
    # Only the first night's rows remain: the replaced night's rows were undone, not kept.
    assert query(two_nights, "SELECT count(*), count(valid_to) FROM marts.published_users_history") == [(7, 0)]


def test_rule11_a_night_dated_before_a_kept_one_is_refused_and_nothing_is_published(two_nights):
    current = (two_nights.parent / "export" / "current").resolve()
    result = build_and_publish(night(two_nights, at(19), second=False), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "before the latest kept night 2026-01-21" in failure.event_specific_data.error.to_string()
    assert (two_nights.parent / "export" / "current").resolve() == current
    assert [d for (d,) in query(two_nights, "SELECT strftime(collection_date, '%Y-%m-%d') FROM marts.nights "
                                            "ORDER BY 1")] == ["2026-01-20", "2026-01-21"]
    assert dicts(two_nights, CHANGES_SQL, ["2026-01-20", "2026-01-21"]) == EXPECTED


@pytest.mark.parametrize(("since", "expected"), [
    (None, "2026-01-21"), ("2026-01-19", None), ("2026-01-20", "2026-01-20"), ("2026-01-22", "2026-01-21"),
    ("2026-01-23", "2026-01-23"), ("2099-12-31", "2026-01-23"),
])
def test_api_night_a_is_the_latest_kept_night_on_or_before_since_else_the_one_before_tonight(since, expected):
    assert night_a(["2026-01-20", "2026-01-21", "2026-01-23"], since) == expected


def test_api_without_since_one_kept_night_has_no_night_a():
    assert night_a(["2026-01-20"], None) is None


@pytest.mark.parametrize("text", ["2026-1-20", "20260120", "2026-02-30", "2026-01-20T00:00", " 2026-01-20",
                                  "２０２６-01-20", "", "2026-13-01"])
def test_api_since_must_be_a_yyyy_mm_dd_calendar_date(text):
    with pytest.raises(BadDate):
        parse_date(text)


# -- /changes answered by m365-serve from the version's changed users' history ----------------------

def test_concurrent_first_changes_requests_on_a_real_server_all_get_the_rule12_answer(two_nights, start_server):
    server = start_server(two_nights.parent)
    wanted = {"": EXPECTED, "Beta": [r for r in EXPECTED if "Beta" in (r["organization_name"],
                                                                        r["previous_organization_name"])]}

    def get(org: str) -> tuple[str, requests.Response]:
        params = {"since": "2026-01-20", **({"org": org} if org else {})}
        return org, requests.get(server.base_url + "/api/m365/changes", params=params, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(get, ["", "Beta"] * 8))
    for org, answer in answers:
        assert answer.status_code == 200 and answer.json()["changes"] == wanted[org], org
    for org in wanted:  # one body (and validator) per selection, whichever request made it
        assert len({(a.content, a.headers["etag"]) for o, a in answers if o == org}) == 1


def test_a_new_version_is_answered_with_its_own_changes_not_the_cached_ones(two_nights, start_server):
    server = start_server(two_nights.parent)
    url = server.base_url + "/api/m365/changes?since=2026-01-20"
    assert requests.get(url, timeout=30).json()["changes"] == EXPECTED
    build_and_publish(night(two_nights, at(21, 23, 40), second=False))  # the 21st again, now like the 20th
    assert requests.get(url, timeout=30).json()["changes"] == []


def test_a_version_published_without_the_changed_users_file_says_changes_are_not_available(tmp_path):
    writer = VersionWriter(export_dir(tmp_path))
    writer.write_bytes("summary", "summary.json", b"{}", "application/json")
    writer.commit({"nights": [{"date": "2026-01-20", "last_collected": "2026-01-20T23:00:00Z"},
                              {"date": "2026-01-21", "last_collected": "2026-01-21T23:00:00Z"}],
                   "history_organizations": {"Acme": "key"}})
    answer = Dashboard(tmp_path).respond("GET", "/api/m365/changes", "", {})
    assert answer.status == 404
    assert "published before the pipeline kept them" in json.loads(answer.body)["error"]


def test_an_unreadable_changed_users_file_is_a_json_500_naming_no_path_and_the_rest_is_served(two_nights):
    version = (two_nights.parent / "export" / "current").resolve()
    (version / CHANGED_USERS_FILE).write_bytes(b"not parquet")
    dashboard = Dashboard(two_nights.parent)
    answer = dashboard.respond("GET", "/api/m365/changes", "", {})
    error = json.loads(answer.body)
    assert answer.status == 500 and error["status"] == "error" and "cannot be read" in error["error"]
    assert str(version) not in error["error"] and "parquet" not in error["error"]
    assert dashboard.respond("GET", "/api/m365/history", "", {}).status == 200


def test_a_version_published_with_one_history_file_per_organization_is_still_served_from_them(tmp_path):
    """Versions published before history/organizations.json: each organization's files by a key."""
    writer = VersionWriter(export_dir(tmp_path))
    body = {"json": b'{"status":"success","organization":"Acme","history":[]}', "csv": b"date\r\n"}
    for fmt in ("json", "csv"):
        writer.write_bytes(f"history:{fmt}:k1", f"history/k1.{fmt}", body[fmt], "x")
    writer.commit({"nights": [{"date": "2026-01-20", "last_collected": "2026-01-20T23:00:00Z"}],
                   "history_organizations": {"Acme": "k1"}})
    for fmt in ("json", "csv"):
        answer = Dashboard(tmp_path).respond("GET", "/api/m365/history", f"org=Acme&format={fmt}", {})
        assert (answer.status, answer.body) == (200, body[fmt])


def test_a_version_published_with_a_changes_file_per_night_is_still_answered_from_them(tmp_path):
    """Versions published before the changed users' history: the night's file as it is, or selected by org
    (rule 12: organization_name or previous_organization_name), until the next run publishes."""
    rows = [{**dict.fromkeys(CHANGE_FIELDS), "organization_name": "Acme", "user_principal_name": "a@acme.com",
             "change": "added"},
            {**dict.fromkeys(CHANGE_FIELDS), "organization_name": "Beta", "previous_organization_name": "Acme",
             "user_principal_name": "m@beta.com", "change": "moved"},
            {**dict.fromkeys(CHANGE_FIELDS), "organization_name": "Beta", "user_principal_name": "b@beta.com",
             "change": "removed"}]
    stamps = ("2026-01-20T23:00:00Z", "2026-01-21T23:00:00Z")
    writer = VersionWriter(export_dir(tmp_path))
    for fmt in ("json", "csv"):
        writer.write_bytes(f"changes:{fmt}:2026-01-20", f"changes/2026-01-20.{fmt}", changes_body(*stamps, rows, fmt),
                           "x")
    writer.commit({"nights": [{"date": "2026-01-20", "last_collected": stamps[0]},
                              {"date": "2026-01-21", "last_collected": stamps[1]}],
                   "history_organizations": {"Acme": "k1", "Beta": "k2"}})
    dashboard = Dashboard(tmp_path)
    for fmt in ("json", "csv"):
        answer = dashboard.respond("GET", "/api/m365/changes", f"since=2026-01-20&format={fmt}", {})
        assert (answer.status, answer.body) == (200, changes_body(*stamps, rows, fmt))
    answer = dashboard.respond("GET", "/api/m365/changes", "org=Acme", {})
    assert answer.status == 200
    assert [r["user_principal_name"] for r in json.loads(answer.body)["changes"]] == ["a@acme.com", "m@beta.com"]
