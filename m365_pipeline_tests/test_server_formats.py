"""``format`` on every endpoint (issue 26, item 6): an unknown one is a 400 everywhere, as on /export, and
``/summary?format=csv`` serves the version's summary CSV (for billing staff) with the JSON unchanged."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil

import pytest
import requests

from m365_pipeline.publishing import VersionWriter, export_dir

ORG_FIELDS = ("organization_name", "es_user_count", "m365_licensed_user_count")


@pytest.mark.parametrize("path", ["/api/m365/summary", "/api/m365/users?org={org}", "/api/m365/export",
                                  "/api/m365/history", "/api/m365/changes", "/api/m365/coverage"])
@pytest.mark.parametrize("fmt", ["xml", "CSV", "", "json "])
def test_an_unknown_format_is_a_400_on_every_endpoint(session_server, published, path, fmt):
    org = published.truth["organizations"][0]["organization_name"]
    url = session_server.base_url + path.format(org=requests.utils.quote(org, safe=""))
    answer = requests.get(url, params={"format": fmt}, timeout=5)
    assert answer.status_code == 400, (path, fmt, answer.text)
    assert answer.json() == {"status": "error", "error": f"unknown format {fmt!r}; use one of: json, csv"}


def test_users_of_one_organization_are_json_only(session_server, published):
    org = published.truth["organizations"][0]["organization_name"]
    answer = requests.get(session_server.base_url + "/api/m365/users", params={"org": org, "format": "csv"},
                          timeout=5)
    assert answer.status_code == 400 and "/api/m365/export?format=csv" in answer.json()["error"]
    plain = requests.get(session_server.base_url + "/api/m365/users", params={"org": org}, timeout=5)
    explicit = requests.get(session_server.base_url + "/api/m365/users", params={"org": org, "format": "json"},
                            timeout=5)
    assert plain.status_code == explicit.status_code == 200 and plain.content == explicit.content


def summary_csv(summary: dict) -> bytes:
    """The per-organization counts as the test expects them: RFC 4180 by Python's csv, CRLF lines."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(ORG_FIELDS)
    for org in summary["organizations"]:
        writer.writerow([org[field] for field in ORG_FIELDS])
    return out.getvalue().encode("utf-8")


@pytest.fixture
def with_summary_csv(published, tmp_path):
    """The shared version's summary, republished with a ``summary:csv`` file made by the test."""
    data_dir = tmp_path / "data"
    source = (export_dir(published.data_dir) / "current").resolve()
    summary = json.loads((source / "summary.json").read_bytes())
    writer = VersionWriter(export_dir(data_dir))
    writer.write_bytes("summary", "summary.json", (source / "summary.json").read_bytes(), "application/json")
    body = summary_csv(summary) * 20  # past the gzip threshold, so the gzip twin is served too
    writer.write_bytes("summary:csv", "summary.csv", body, "text/csv; charset=utf-8")
    writer.commit({"nights": []})
    return data_dir, body, summary, source


def test_summary_format_csv_is_the_versions_summary_csv_with_validators_and_gzip(with_summary_csv, start_server):
    data_dir, body, summary, source = with_summary_csv
    served = start_server(data_dir)
    url = served.base_url + "/api/m365/summary"
    answer = requests.get(url, params={"format": "csv"}, headers={"Accept-Encoding": "identity"}, timeout=5)
    assert answer.status_code == 200 and answer.content == body
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"].startswith('attachment; filename="m365-summary-')
    rows = list(csv.DictReader(io.StringIO(answer.content.decode())))[:len(summary["organizations"])]
    assert [{k: int(v) if k != "organization_name" else v for k, v in row.items()} for row in rows] == \
        [{k: org[k] for k in ORG_FIELDS} for org in summary["organizations"]]
    assert requests.get(url, params={"format": "csv"}, timeout=5,
                        headers={"If-None-Match": answer.headers["etag"], "Accept-Encoding": "identity"}
                        ).status_code == 304
    zipped = requests.get(url, params={"format": "csv"}, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=5)
    assert zipped.headers["content-encoding"] == "gzip" and gzip.decompress(zipped.raw.read()) == body
    assert zipped.headers["etag"] != answer.headers["etag"]
    json_answer = requests.get(url, timeout=5)
    assert json_answer.content == (source / "summary.json").read_bytes()  # the documented JSON, unchanged
    assert requests.get(url, params={"format": "json"}, timeout=5).content == json_answer.content


def test_summary_csv_of_a_version_without_it_is_a_clear_404(published, tmp_path, start_server):
    data_dir = tmp_path / "data"
    shutil.copytree(published.data_dir / "export", data_dir / "export", symlinks=True)
    current = (export_dir(data_dir) / "current").resolve()
    manifest = json.loads((current / "manifest.json").read_bytes())
    if manifest["files"].pop("summary:csv", None) is not None:  # once the pipeline writes it
        (current / "manifest.json").write_text(json.dumps(manifest))
    served = start_server(data_dir)
    answer = requests.get(served.base_url + "/api/m365/summary", params={"format": "csv"}, timeout=5)
    assert answer.status_code == 404
    assert "summary CSV is not in this published version" in answer.json()["error"]
