"""GET /api/m365/coverage (docs/RULES.md, rule 13 and the endpoint's section) over a real m365-serve,
field for field against the simulator's independent ground truth, with the documented endpoints'
errors, caching, gzip and hostile-input behaviour."""

from __future__ import annotations

import csv
import gzip
import io
from urllib.parse import quote, quote_plus

import pytest
import requests

from m365_pipeline.api_bodies import COVERAGE_ORG_FIELDS, COVERAGE_USER_FIELDS, coverage_key
from m365_pipeline.resources import PublishPolicy

from .helpers import rule16, run_pipeline
from .test_server_hardening import HOSTILE_ORGS, assert_json_error, assert_still_serving, raw_get

COVERAGE = "/api/m365/coverage"


def _get(server, **params) -> requests.Response:
    return requests.get(server.base_url + COVERAGE, params=params or None, timeout=10)


def _csv(text: str) -> list[list[str]]:
    assert text.endswith("\r\n"), "RFC 4180 records end with CRLF"
    return list(csv.reader(io.StringIO(text, newline="")))


def _cell(value) -> str:
    """A CSV cell: booleans true/false, text as rule 16 writes it."""
    return "true" if value is True else "false" if value is False else rule16(value) if isinstance(value, str) \
        else str(value)


def test_overview_matches_ground_truth_in_summary_order(session_server, published):
    response = _get(session_server)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    truth = published.truth["coverage"]
    assert list(body) == ["status", "organizations", "totals", "last_collected"]
    assert body["status"] == "success"
    assert body["organizations"] == truth["organizations"]
    assert [list(o) for o in body["organizations"]] == [list(COVERAGE_ORG_FIELDS)] * len(truth["organizations"])
    assert body["totals"] == truth["totals"]
    assert list(body["totals"]) == ["total_organizations", "total_es_users", "total_es_users_backed_up",
                                    "total_es_users_not_backed_up", "total_backed_up_without_email_license"]
    summary = requests.get(session_server.base_url + "/api/m365/summary", timeout=10).json()
    assert body["last_collected"] == summary["last_collected"]
    assert [o["organization_name"] for o in body["organizations"]] == \
           [o["organization_name"] for o in summary["organizations"]]
    # The simulator has real gaps of both kinds, and rule 13's es_user_count is the summary's.
    assert truth["totals"]["total_es_users_not_backed_up"] > 0
    assert truth["totals"]["total_backed_up_without_email_license"] > 0
    assert [o["es_user_count"] for o in body["organizations"]] == \
           [o["es_user_count"] for o in summary["organizations"]]


def test_every_organizations_rows_match_ground_truth(session_server, published):
    statuses = set()
    for name, rows in published.truth["coverage"]["users"].items():
        body = _get(session_server, org=name).json()
        assert body == {"status": "success", "organization": name, "users": rows, "total_users": len(rows)}, name
        assert all(list(row) == list(COVERAGE_USER_FIELDS) for row in body["users"])
        statuses |= {row["backup_status"] for row in rows}
    assert statuses == {"active", "excluded", "available", "none"}


def test_csv_forms_have_json_field_names_as_header_and_match_ground_truth(session_server, published):
    truth = published.truth["coverage"]
    response = _get(session_server, format="csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="m365-coverage-')
    assert _csv(response.content.decode("utf-8")) == [
        list(COVERAGE_ORG_FIELDS), *([_cell(o[f]) for f in COVERAGE_ORG_FIELDS] for o in truth["organizations"])]
    for name, rows in truth["users"].items():
        response = _get(session_server, org=name, format="csv")
        disposition = response.headers["content-disposition"]
        assert disposition.isascii() and '"' not in disposition.split('filename="')[1][:-1], disposition
        assert _csv(response.content.decode("utf-8")) == [
            list(COVERAGE_USER_FIELDS), *([_cell(r[f]) for f in COVERAGE_USER_FIELDS] for r in rows)], name


@pytest.mark.parametrize(("params", "status", "fragment"), [
    ({"format": "xml"}, 400, "format"),
    ({"format": "JSON"}, 400, "format"),
    ({"format": ""}, 400, "format"),
    ({"org": ""}, 400, "org"),
    ({"org": "No Such Org"}, 404, "not found"),
    ({"org": "No Such Org", "format": "csv"}, 404, "not found"),
])
def test_coverage_errors_are_documented_json_errors(session_server, params, status, fragment):
    response = _get(session_server, **params)
    assert response.status_code == status
    body = response.json()
    assert body["status"] == "error" and fragment in body["error"]


def test_org_lookup_is_exact_and_decodes_as_an_html_form(session_server, published):
    for name in published.truth["coverage"]["users"]:
        for encoded in (quote_plus(name), quote(name, safe="")):
            response = raw_get(session_server.port, f"{COVERAGE}?org={encoded}&format=json")
            assert response.status == 200, name
        assert _get(session_server, org=name.upper() + " ").status_code in (200, 404)  # another name, or none


def test_repeated_parameters_are_a_400(session_server):
    assert_json_error(raw_get(session_server.port, f"{COVERAGE}?format=json&format=csv"), {400}, "repeated")


@pytest.mark.parametrize("value", HOSTILE_ORGS, ids=lambda v: v[:40])
def test_hostile_org_values_are_a_json_404_without_file_content(session_server, published, value):
    real_org = published.truth["organizations"][0]["organization_name"]
    digest = coverage_key(real_org, "json").rsplit(":", 1)[1]
    value = value.format(hash=digest, users_file=quote(f"coverage/{digest}.json", safe=""), version_dir="x")
    response = raw_get(session_server.port, f"{COVERAGE}?org={value}")
    body = assert_json_error(response, {400, 404, 414}, value)
    for leaked in (b'"users"', b'"organizations"', b'"success"', b'"totals"'):
        assert leaked not in response.body, f"{value!r}: published content leaked: {response.body[:300]!r}"
    assert len(body["error"]) <= 300
    assert_still_serving(session_server)


def _targets(published) -> list[str]:
    name = max(published.truth["coverage"]["users"], key=lambda n: len(published.truth["coverage"]["users"][n]))
    return [COVERAGE, f"{COVERAGE}?format=csv", f"{COVERAGE}?org={quote_plus(name)}",
            f"{COVERAGE}?org={quote_plus(name)}&format=csv"]


def test_validators_304_cors_and_gzip_as_the_documented_endpoints(session_server, published):
    for target in _targets(published):
        first = raw_get(session_server.port, target, [("Accept-Encoding", "identity")])
        assert first.status == 200, target
        assert first.headers["cache-control"] == "no-cache" and first.headers["access-control-allow-origin"] == "*"
        etag, modified = first.headers["etag"], first.headers["last-modified"]
        for condition in (("If-None-Match", etag), ("If-Modified-Since", modified)):
            again = raw_get(session_server.port, target, [("Accept-Encoding", "identity"), condition])
            assert again.status == 304 and again.body == b"", (target, condition)
        zipped = raw_get(session_server.port, target, [("Accept-Encoding", "gzip")])
        if len(first.body) >= 1024:  # large answers go compressed, and decompress to the same bytes
            assert zipped.headers.get("content-encoding") == "gzip", target
            assert gzip.decompress(zipped.body) == first.body and zipped.headers["etag"] != etag
        else:
            assert zipped.body == first.body
    assert any(len(raw_get(session_server.port, t).body) >= 1024 for t in _targets(published))


def test_head_and_options_behave_as_on_the_documented_endpoints(session_server):
    head = requests.head(session_server.base_url + COVERAGE, timeout=10)
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"]
    assert requests.options(session_server.base_url + COVERAGE, timeout=10).status_code == 204
    post = requests.post(session_server.base_url + COVERAGE, timeout=10)
    assert post.status_code == 405 and post.json()["status"] == "error"


@pytest.mark.slow
def test_without_source_b_coverage_is_a_404_saying_so_and_the_summary_still_answers(
        start_simulator, start_server, tmp_path):
    sim = start_simulator(orgs=3, users_per_org=4)
    data_dir = tmp_path / "data"
    # No source B means no organizations; a policy accepting that lets this night publish at all.
    run_pipeline(sim, data_dir, sources=("saas",), policy=PublishPolicy(min_organizations=0))
    served = start_server(data_dir)
    for params in ({}, {"format": "csv"}, {"org": "Anything"}):
        response = _get(served, **params)
        assert response.status_code == 404, params
        assert "source B" in response.json()["error"] and "BACKUP_API_BASE_URL" in response.json()["error"]
    assert requests.get(served.base_url + "/api/m365/summary", timeout=10).status_code == 200
