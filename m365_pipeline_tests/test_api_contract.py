"""The Dashboard API (docs/RULES.md, The published API), field for field, against the simulator's
independent ground truth.

Every endpoint over a real socket: the summary, every organization's users, and the export in
both formats for all three sorts, plus the invariants of contract rule 8.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime

import pytest
import requests

from m365_pipeline.api_bodies import SORT_FIELDS

from .helpers import rule9, rule16

USER_KEYS = ["user_principal_name", "display_name", "licenses", "has_email_license"]
EXPORT_KEYS = ["organization_name", *USER_KEYS]


def _get(server, path: str, **params) -> requests.Response:
    return requests.get(server.base_url + path, params=params or None, timeout=10)


def _expected_export(truth) -> list[dict]:
    return [
        {"organization_name": org["organization_name"], **user}
        for org in truth["organizations"] for user in truth["users"].get(org["organization_name"], [])
    ]


def test_summary_matches_ground_truth_field_for_field(session_server, published):
    response = _get(session_server, "/api/m365/summary")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["status", "organizations", "totals", "last_collected", "metadata"]
    assert body["status"] == "success"
    assert body["organizations"] == published.truth["organizations"]
    assert body["totals"] == published.truth["totals"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["last_collected"])
    collected = datetime.strptime(body["last_collected"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - collected).total_seconds()) < 3600
    assert isinstance(body["metadata"]["query_time_ms"], int) and body["metadata"]["query_time_ms"] >= 0


def test_users_of_every_organization_match_ground_truth(session_server, published):
    for org in published.truth["organizations"]:
        name = org["organization_name"]
        response = _get(session_server, "/api/m365/users", org=name)
        assert response.status_code == 200, name
        body = response.json()
        assert list(body) == ["status", "organization", "users", "total_users"]
        assert body["status"] == "success" and body["organization"] == name
        assert body["users"] == published.truth["users"].get(name, [])
        assert all(list(user) == USER_KEYS for user in body["users"])


def test_rule8_invariants_hold_between_summary_and_users(session_server):
    summary = _get(session_server, "/api/m365/summary").json()
    for org in summary["organizations"]:
        users = _get(session_server, "/api/m365/users", org=org["organization_name"]).json()
        assert users["total_users"] == org["m365_licensed_user_count"] == len(users["users"])
        assert sum(u["has_email_license"] for u in users["users"]) == org["es_user_count"]
    assert summary["totals"]["total_organizations"] == len(summary["organizations"])
    assert summary["totals"]["total_es_users"] == sum(o["es_user_count"] for o in summary["organizations"])
    export = _get(session_server, "/api/m365/export").json()
    assert export["total_records"] == summary["totals"]["total_m365_licensed_users"] == len(export["data"])
    assert export["last_collected"] == summary["last_collected"]


def _sorted_rows(rows: list[dict], sort: str) -> list[dict]:
    ties = {
        "organization_name": lambda r: (rule9(r["organization_name"]), rule9(r["user_principal_name"])),
        "user_principal_name": lambda r: (rule9(r["user_principal_name"]), rule9(r["organization_name"])),
        "display_name": lambda r: (rule9(r["display_name"]), rule9(r["organization_name"]),
                                   rule9(r["user_principal_name"])),
    }
    return sorted(rows, key=ties[sort])


@pytest.mark.parametrize("sort", SORT_FIELDS)
def test_json_export_matches_ground_truth_in_each_sort_order(session_server, published, sort):
    response = _get(session_server, "/api/m365/export", format="json", sort=sort)
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["status", "data", "total_records", "last_collected"]
    assert body["status"] == "success"
    assert body["data"] == _sorted_rows(_expected_export(published.truth), sort)
    assert all(list(row) == EXPORT_KEYS for row in body["data"])
    assert body["total_records"] == len(body["data"])


@pytest.mark.parametrize("sort", SORT_FIELDS)
def test_csv_export_matches_ground_truth_and_parses_with_a_real_csv_reader(session_server, published, sort):
    response = _get(session_server, "/api/m365/export", format="csv", sort=sort)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="m365-users-')
    text = response.content.decode("utf-8")
    assert text.count("\r\n") == text.count("\n")  # RFC 4180: every record ends with CRLF
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, *rows = list(reader)
    assert header == EXPORT_KEYS
    expected = [  # text cells as rule 16 writes them
        [rule16(r["organization_name"]), rule16(r["user_principal_name"]), rule16(r["display_name"]),
         rule16(r["licenses"]), "true" if r["has_email_license"] else "false"]
        for r in _sorted_rows(_expected_export(published.truth), sort)
    ]
    assert rows == expected


def test_export_defaults_are_json_sorted_by_organization_name(session_server):
    default = _get(session_server, "/api/m365/export")
    explicit = _get(session_server, "/api/m365/export", format="json", sort="organization_name")
    assert default.content == explicit.content


def test_messy_names_survive_the_round_trip(session_server, published):
    """The simulator's hostile organization names (quotes, '/', '%', non-Latin) come back exactly."""
    names = [o["organization_name"] for o in published.truth["organizations"]]
    assert any(not name.isascii() for name in names) and any('"' in name or "/" in name for name in names)
    for name in names:
        assert _get(session_server, "/api/m365/users", org=name).json()["organization"] == name


@pytest.mark.parametrize(
    ("path", "params", "status", "fragment"),
    [
        ("/api/m365/users", {}, 400, "org"),
        ("/api/m365/users", {"org": ""}, 400, "org"),
        ("/api/m365/users", {"org": "No Such Org"}, 404, "not found"),
        ("/api/m365/export", {"format": "xml"}, 400, "format"),
        ("/api/m365/export", {"sort": "licenses"}, 400, "sort"),
        ("/api/m365/nope", {}, 404, "not found"),
    ],
)
def test_documented_errors(session_server, path, params, status, fragment):
    response = _get(session_server, path, **params)
    assert response.status_code == status
    body = response.json()
    assert body["status"] == "error" and fragment in body["error"]


def test_no_data_published_yet_is_a_404_with_a_hint(start_server, tmp_path):
    (tmp_path / "empty").mkdir()
    served = start_server(tmp_path / "empty")
    response = requests.get(served.base_url + "/api/m365/summary", timeout=5)
    assert response.status_code == 404
    assert "nothing has been published yet" in response.json()["error"]
