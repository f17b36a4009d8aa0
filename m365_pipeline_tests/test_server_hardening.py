"""m365-serve under hostile input, caching rules, HTTPS, shutdown and version swaps.

Everything runs against real ``m365-serve`` processes over real sockets on 127.0.0.1. Request
targets that must reach the server byte for byte go out through raw sockets: requests/urllib3
remove dot segments (``/a/../b`` becomes ``/b``) and refuse some bytes, which would hide exactly
what these tests are about.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote_plus

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m365_pipeline.api_bodies import CONTENT_TYPES, FORMATS, SORT_FIELDS, export_file_name, json_bytes, users_file_name
from m365_pipeline.processes import free_port
from m365_pipeline.publishing import (
    CURRENT,
    MANIFEST,
    VERSIONS,
    PublishedVersion,
    VersionWriter,
    current_version_dir,
    export_dir,
)

from .helpers import BIN, make_certificate, run_pipeline

SERVE = str(BIN / "m365-serve")
SUMMARY = "/api/m365/summary"
# m365-serve's own access log: [time] client "METHOD path?query" status duration
# (quotes, backslashes and control characters inside the target are backslash-escaped)
ACCESS_LINE = re.compile(r'^\[[^\]]+\] 127\.0\.0\.1:\d+ "(?P<method>\S+) (?P<path>(?:[^"\\?]|\\.)*)'
                         r'(?:\?(?:[^"\\]|\\.)*)?" (?P<status>\d{3}) [\d.]+ms$')


# -- raw HTTP/1.1 over a socket --------------------------------------------------------------------

@dataclass
class Raw:
    status: int | None  # None: the server closed the connection without answering
    headers: dict[str, str]  # lower-cased names
    body: bytes  # everything after the header block, up to the server closing the connection


def request_bytes(target: str | bytes, method: str = "GET", headers: list[tuple[str, str]] | None = None,
                  extra: bytes = b"") -> bytes:
    """One HTTP/1.1 request with ``target`` sent exactly as given, and Connection: close."""
    target = target if isinstance(target, bytes) else target.encode("ascii")
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def exchange(port: int, payload: bytes, timeout: float = 10.0) -> Raw:
    """Send ``payload``, read until the server closes, parse one response (or none)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before reading it all; whatever it answered is read below
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"no end of response within {timeout} s"
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"server neither answered nor closed within {timeout} s") from None
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        return Raw(None, {}, b"")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1."), f"not an HTTP response: {data[:200]!r}"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Raw(int(status_line.split()[1]), headers, body)


def raw_get(port: int, target: str | bytes, headers: list[tuple[str, str]] | None = None,
            method: str = "GET") -> Raw:
    return exchange(port, request_bytes(target, method, headers))


def assert_json_error(response: Raw, statuses: set[int], what: object) -> dict:
    """A clean API error: an expected 4xx, JSON ``{"status": "error", "error": ...}``, CORS, no file."""
    assert response.status in statuses, (
        f"{what!r}: expected HTTP {sorted(statuses)}, got {response.status}: {response.body[:300]!r}")
    assert response.headers.get("content-type", "").startswith("application/json"), (what, response.headers)
    assert response.headers.get("access-control-allow-origin") == "*", (what, response.headers)
    assert b"root:" not in response.body, f"{what!r}: /etc/passwd content in the answer"
    body = json.loads(response.body)
    assert set(body) == {"status", "error"}, f"{what!r}: an error must carry nothing else: {body}"
    assert body["status"] == "error" and isinstance(body["error"], str) and body["error"], body
    return body


def assert_refused(response: Raw, what: object) -> None:
    """Protocol-level abuse: any 4xx, or the connection closed; never a 5xx, never data."""
    assert response.status is None or 400 <= response.status < 500, (
        f"{what!r}: expected a 4xx or a closed connection, got {response.status}: {response.body[:300]!r}")
    assert b"root:" not in response.body and b'"success"' not in response.body, (what, response.body[:300])
    if response.status is not None and response.body:
        assert_json_error(response, {response.status}, what)


def assert_still_serving(served) -> None:
    """The server answers a normal request and has never logged a 5xx or a traceback."""
    response = requests.get(served.base_url + SUMMARY, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "success"
    log = served.log_path.read_text(errors="replace")
    assert "Traceback" not in log, f"traceback in the server log:\n{log[-3000:]}"
    five_xx = [line for line in log.splitlines()
               if (match := ACCESS_LINE.match(line)) and match["status"].startswith("5")]
    assert not five_xx, f"the server answered 5xx: {five_xx[:5]}"


# -- 1. hostile input ------------------------------------------------------------------------------

PATH_TRAVERSALS = [
    "/api/m365/../../etc/passwd",
    "/api/m365/../../../../../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "/api/m365/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/m365/users/../summary",
    "/api/m365/./summary",
    "/api/m365/summary/..",
    "/api/m365/summary/",
    "//etc/passwd",
    "///api/m365/summary",
    "/etc/passwd",
    "/static/../../pyproject.toml",
    "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/pyproject.toml",
    "/api/m365/..\\..\\etc\\passwd",
    "/api/m365/%5c..%5c..%5cetc%5cpasswd",
    "/api/m365/users%2f..%2f..%2f..%2fetc%2fpasswd",
    "/api/m365/users%2F..%2Fsummary",
    "/api/m365/summary%00",
    "/api/m365/summary%00.json",
    "/api/m365/summary.json",
    "/api/m365/manifest.json",
    "/api/m365/current/manifest.json",
    "/current/summary.json",
    "/export/current/manifest.json",
    "/data/export/current/summary.json",
    "/m365.duckdb",
    "/API/M365/SUMMARY",
    "http://127.0.0.1/../../etc/passwd",  # absolute-form target
]


@pytest.mark.parametrize("target", PATH_TRAVERSALS)
def test_path_traversal_in_the_path_is_a_json_404_and_the_server_keeps_serving(session_server, target):
    response = raw_get(session_server.port, target)
    assert_json_error(response, {404}, target)
    assert b"[build-system]" not in response.body and b'"files"' not in response.body
    assert_still_serving(session_server)


def test_published_file_paths_are_not_routes(session_server, published):
    """Files of the version dir are reachable only through the three endpoints, never by name."""
    version = current_version_dir(export_dir(published.data_dir))
    some_org = published.truth["organizations"][0]["organization_name"]
    users_file = users_file_name(some_org)
    for target in [f"/{users_file}", f"/api/m365/{users_file}", f"/api/m365/users/{users_file[6:]}",
                   f"/api/m365/export/{export_file_name('organization_name', 'csv')}",
                   f"/versions/{version.name}/{MANIFEST}", f"/api/m365/../versions/{version.name}/summary.json",
                   quote(str(version / "summary.json"))]:
        assert_json_error(raw_get(session_server.port, target), {404}, target)
    assert_still_serving(session_server)


@pytest.mark.parametrize(("target", "same_as"), [
    ("/api%2Fm365%2Fsummary", "/api/m365/summary"),
    ("/api/m365%2Fsummary", "/api/m365/summary"),
    ("/api/m365%2fexport", "/api/m365/export"),
    ("/api%2Fm365%2F..%2F..%2Fetc%2Fpasswd", None),
])
def test_encoded_slash_reaches_nothing_beyond_the_decoded_route(session_server, target, same_as):
    """granian hands the app a percent-decoded path (as nginx does by default), so ``%2F`` acts as ``/``.

    Accepted, because routing is an exact whitelist: an encoded slash can only ever name a
    documented route (same bytes as the plain path) or get the JSON 404, never anything else.
    """
    response = raw_get(session_server.port, target)
    if same_as is None:
        assert_json_error(response, {404}, target)
    else:
        plain = raw_get(session_server.port, same_as)
        assert (response.status, response.body) == (plain.status, plain.body)
    assert_still_serving(session_server)


# org values as sent on the wire (already percent-encoded where needed); {hash}, {users_file},
# {version_dir} are replaced with values of the real published version.
HOSTILE_ORGS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "..%2F..%2Fmanifest",
    "..%2F..%2Fmanifest.json",
    "..%2Fmanifest.json",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fsummary.json",
    "..",
    ".",
    "manifest.json",
    "summary.json",
    "summary",
    "current",
    "versions",
    "users",
    "export%2Forganization_name.json",
    "..%2Fexport%2Forganization_name.csv",
    "{hash}",
    "{hash}.json",
    "{users_file}",
    "..%2F{users_file}",
    "{version_dir}%2F{users_file}",
    "{version_dir}%2F" + MANIFEST,
    "%00",
    "%00..%2F..%2Fetc%2Fpasswd",
    "manifest.json%00",
    "%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "%3Cscript%3Ealert(%27x%27)%3C%2Fscript%3E",
    "%27%20OR%20%271%27%3D%271",
    "%22%22",
    "%zz",
    "%",
    "%25",
    "%25zz",
    "%2525",
    "+",
    "++",
    "a" * 5000,
]


@pytest.mark.parametrize("value", HOSTILE_ORGS, ids=lambda v: v[:40])
def test_hostile_org_values_are_a_json_404_without_file_content(session_server, published, value):
    version = current_version_dir(export_dir(published.data_dir))
    real_org = published.truth["organizations"][0]["organization_name"]
    users_file = users_file_name(real_org)
    value = value.format(hash=users_file[6:-5], users_file=quote(users_file, safe=""),
                         version_dir=quote(str(version), safe=""))
    response = raw_get(session_server.port, "/api/m365/users?org=" + value)
    body = assert_json_error(response, {404}, value)
    for leaked in (b'"files"', b'"totals"', b'"users"', b'"data"', b'"organization"', b'"success"'):
        assert leaked not in response.body, f"{value!r}: content of a published file leaked: {response.body[:300]!r}"
    assert len(body["error"]) <= 300, "the echoed name must be truncated"
    assert_still_serving(session_server)


def test_ten_thousand_character_org_is_refused_cleanly(session_server):
    # 404 (unknown organization) or 414: the app caps query strings at 8192 characters.
    response = raw_get(session_server.port, "/api/m365/users?org=" + "x" * 10_000)
    assert_json_error(response, {404, 414}, "10,000-char org")
    assert len(response.body) < 1000
    assert_still_serving(session_server)


def test_org_lookup_is_exact_and_decodes_as_an_html_form(session_server, published):
    """``+`` and ``%20`` are spaces, ``%2B`` is a plus; names differing in case or whitespace are different."""
    names = [o["organization_name"] for o in published.truth["organizations"]]
    for name in names:  # includes names with '/', '..', '%', '?#', quotes, <script> and non-Latin letters
        for encoded in (quote_plus(name), quote(name, safe="")):
            response = raw_get(session_server.port, "/api/m365/users?org=" + encoded)
            assert response.status == 200, (name, encoded, response.body[:200])
            assert json.loads(response.body)["organization"] == name
    spaced = next(n for n in names if " " in n)
    for variant in (quote(spaced, safe="").replace("%20", "%2B"), quote_plus(spaced.swapcase()),
                    quote_plus(spaced + "  "), quote_plus(" " + spaced), quote_plus(spaced) + "%00"):
        if unquote_plus(variant) not in names:
            assert_json_error(raw_get(session_server.port, "/api/m365/users?org=" + variant), {404}, variant)
    assert_still_serving(session_server)


PROTOCOL_ABUSE = {
    "20 kB query": request_bytes("/api/m365/users?org=" + "a" * 20_000),
    "100 kB query": request_bytes("/api/m365/export?format=" + "b" * 100_000),
    "invalid UTF-8 bytes in the query": request_bytes(b"/api/m365/users?org=\xff\xfe\xc3"),
    "invalid UTF-8 bytes in the path": request_bytes(b"/api/m365/\xff\xc3"),
    "NUL byte in the path": request_bytes(b"/api/m365/sum\x00mary"),
    "NUL byte in the query": request_bytes(b"/api/m365/users?org=a\x00b"),
    "NUL byte in a header": request_bytes(SUMMARY, extra=b"X-Nul: a\x00b\r\n"),
    "CR in the request line": request_bytes(b"/api/m365/summary\rX"),
    "raw space in the query": request_bytes(b"/api/m365/users?org=a b"),
    "raw <script> in the query": request_bytes(b"/api/m365/users?org=<script>alert(1)</script>"),
    "200 headers": request_bytes(SUMMARY, extra=b"".join(b"X-H%d: v\r\n" % i for i in range(200))),
    "1 MB header": request_bytes(SUMMARY, extra=b"X-Big: " + b"a" * (1 << 20) + b"\r\n"),
    "bad Content-Length": request_bytes(SUMMARY, extra=b"Content-Length: abc\r\n"),
    "HTTP/0.9 request": b"GET /api/m365/summary\r\n\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    "not HTTP at all": b"HELLO\r\n\r\n",
}


@pytest.mark.parametrize("name", list(PROTOCOL_ABUSE))
def test_protocol_abuse_gets_a_4xx_or_a_closed_connection(session_server, name):
    assert_refused(exchange(session_server.port, PROTOCOL_ABUSE[name]), name)
    assert_still_serving(session_server)


def test_a_64_kB_header_is_served_or_refused_but_never_breaks_the_server(session_server):
    # One 64 kB header is legal HTTP; granian's buffer accepts it (a 1 MB one gets 431, above).
    response = exchange(session_server.port, request_bytes(SUMMARY, extra=b"X-Big: " + b"a" * 65536 + b"\r\n"))
    assert response.status == 200 or response.status is None or 400 <= response.status < 500, response.status
    assert_still_serving(session_server)


def test_idle_and_half_sent_requests_do_not_hold_up_other_clients(session_server):
    sockets = []
    try:
        for i in range(100):  # half-sent requests (slowloris) and connections that never send a byte
            sock = socket.create_connection(("127.0.0.1", session_server.port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /api/m365/summary HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)
        started = time.monotonic()
        assert requests.get(session_server.base_url + SUMMARY, timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        slow = sockets[1]  # a slow client that finally completes its request gets its answer
        slow.sendall(b"1\r\nConnection: close\r\n\r\n")
        assert slow.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in sockets:
            sock.close()
    assert_still_serving(session_server)


@pytest.mark.parametrize("query", ["org=%e2%82", "org=%ed%a0%80", "format=%ff", "org=%c3"])
def test_percent_encoded_invalid_utf8_is_a_json_400(session_server, query):
    assert_json_error(raw_get(session_server.port, "/api/m365/users?" + query), {400}, query)
    assert_still_serving(session_server)


@pytest.mark.parametrize("query", ["format=%zz", "sort=%", "format=json%00", "sort=organization_name%20"])
def test_malformed_percent_encoding_in_format_or_sort_is_a_json_400(session_server, query):
    assert_json_error(raw_get(session_server.port, "/api/m365/export?" + query), {400}, query)
    assert_still_serving(session_server)


@pytest.mark.parametrize("target, status", [
    ("/api/m365/users?org=a&org=b", 400),
    ("/api/m365/users?org=a&org=a", 400),
    ("/api/m365/export?format=json&format=csv", 400),
    ("/api/m365/export?sort=display_name&sort=display_name", 400),
    ("/api/m365/users", 400),
    ("/api/m365/users?org=", 400),
    ("/api/m365/users?org", 400),
    ("/api/m365/users?ORG=x", 400),
    ("/api/m365/export?format=xml", 400),
    ("/api/m365/export?format=JSON", 400),
    ("/api/m365/export?format=", 400),
    ("/api/m365/export?sort=licenses", 400),
    ("/api/m365/export?sort=", 400),
    ("/api/m365/export?" + "&".join(f"p{i}=1" for i in range(40)), 400),
    ("/api/m365/nope", 404),
    ("/api/m365/", 404),
    ("/api/m365", 404),
    ("/api", 404),
    ("/favicon.ico", 404),
])
def test_bad_parameters_and_unknown_paths_get_documented_errors(session_server, target, status):
    assert_json_error(raw_get(session_server.port, target), {status}, target)
    assert_still_serving(session_server)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "PROPFIND"])
def test_other_methods_get_405_with_an_allow_header(session_server, method):
    for target in (SUMMARY, "/api/m365/users?org=x", "/nope", "/"):
        response = exchange(session_server.port, request_bytes(
            target, method, extra=b"Content-Length: 5\r\n\r\nhello" if method in ("POST", "PUT", "PATCH") else b""))
        assert_json_error(response, {405}, (method, target))
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",")}
        assert allowed == {"GET", "HEAD", "OPTIONS"}, response.headers
    assert_still_serving(session_server)


def test_options_is_a_204_cors_preflight(session_server):
    response = raw_get(session_server.port, "/api/m365/users?org=x", method="OPTIONS", headers=[
        ("Origin", "https://dashboard.example"), ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "If-None-Match, If-Modified-Since")])
    assert response.status == 204 and response.body == b""
    assert response.headers["access-control-allow-origin"] == "*"
    assert "GET" in response.headers["access-control-allow-methods"]
    allowed_headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"if-none-match", "if-modified-since"} <= allowed_headers
    assert_still_serving(session_server)


@pytest.mark.parametrize("target, accept_encoding", [
    (SUMMARY, None),
    ("/api/m365/export?format=csv&sort=display_name", None),
    ("/api/m365/export", "gzip"),
    ("/api/m365/nope", None),
    ("/api/m365/users", None),
    ("/", None),
])
def test_head_has_the_headers_of_get_and_no_body(session_server, target, accept_encoding):
    headers = [("Accept-Encoding", accept_encoding)] if accept_encoding else []
    get = raw_get(session_server.port, target, headers)
    head = raw_get(session_server.port, target, headers, method="HEAD")
    assert head.status == get.status
    assert head.body == b"", f"HEAD {target} sent a body: {head.body[:100]!r}"
    ignore = {"date"}
    assert {k: v for k, v in head.headers.items() if k not in ignore} == \
           {k: v for k, v in get.headers.items() if k not in ignore}
    assert int(head.headers["content-length"]) == len(get.body)
    assert_still_serving(session_server)


# -- 2. conditional requests and caching -----------------------------------------------------------

def api_targets(published) -> list[str]:
    name = published.truth["organizations"][0]["organization_name"]
    return [SUMMARY, "/api/m365/users?org=" + quote_plus(name), "/api/m365/export",
            *(f"/api/m365/export?format={fmt}&sort={sort}" for fmt in FORMATS for sort in SORT_FIELDS)]


def test_every_api_200_carries_validators_revalidating_cache_control_and_cors(session_server, published):
    for target in api_targets(published):
        response = raw_get(session_server.port, target)
        assert response.status == 200, target
        assert re.fullmatch(r'"[0-9a-f]{16,}"', response.headers.get("etag", "")), (target, response.headers)
        parsedate_to_datetime(response.headers["last-modified"])  # a valid HTTP date
        directives = {d.strip() for d in response.headers.get("cache-control", "").split(",")}
        assert "no-cache" in directives or "max-age=0" in directives, response.headers
        assert response.headers["access-control-allow-origin"] == "*"
        assert "accept-encoding" in response.headers.get("vary", "").lower()


def test_if_none_match_with_the_etag_gives_304_without_a_body(session_server, published):
    for target in api_targets(published):
        etag = raw_get(session_server.port, target).headers["etag"]
        for candidate in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            response = raw_get(session_server.port, target, [("If-None-Match", candidate)])
            assert response.status == 304, (target, candidate, response.status)
            assert response.body == b"", f"304 with a body: {response.body[:100]!r}"
            assert response.headers["etag"] == etag
            assert response.headers["access-control-allow-origin"] == "*"
        stale = raw_get(session_server.port, target, [("If-None-Match", '"0123456789abcdef0123456789abcdef"')])
        assert stale.status == 200 and stale.body


def test_if_modified_since_gives_304_and_an_etag_mismatch_wins(session_server, published):
    for target in api_targets(published)[:3]:
        first = raw_get(session_server.port, target)
        modified = parsedate_to_datetime(first.headers["last-modified"])
        same = raw_get(session_server.port, target, [("If-Modified-Since", first.headers["last-modified"])])
        assert same.status == 304 and same.body == b""
        later = format_datetime(modified.replace(year=modified.year + 1), usegmt=True)
        assert raw_get(session_server.port, target, [("If-Modified-Since", later)]).status == 304
        earlier = format_datetime(modified.replace(year=modified.year - 1), usegmt=True)
        assert raw_get(session_server.port, target, [("If-Modified-Since", earlier)]).status == 200
        assert raw_get(session_server.port, target, [("If-Modified-Since", "not a date")]).status == 200
        # RFC 9110 13.1.3: If-Modified-Since is ignored when If-None-Match is present.
        both = raw_get(session_server.port, target, [("If-None-Match", '"other"'),
                                                     ("If-Modified-Since", first.headers["last-modified"])])
        assert both.status == 200 and both.body == first.body


@pytest.mark.parametrize("accept_encoding, gzipped", [
    (None, False),
    ("gzip", True),
    ("GZIP", True),
    ("gzip, deflate, br", True),
    ("br;q=1.0, gzip;q=0.5", True),
    ("*", True),
    ("gzip;q=0", False),
    ("gzip; q=0.000", False),
    ("*;q=0", False),
    ("gzip;q=0, *", False),
    ("identity", False),
    ("deflate, br", False),
    ("", False),
])
@pytest.mark.parametrize("target", ["/api/m365/export", "/api/m365/export?format=csv&sort=user_principal_name"])
def test_gzip_only_when_accept_encoding_allows_and_it_decompresses_to_the_identity_body(
        session_server, target, accept_encoding, gzipped):
    identity = raw_get(session_server.port, target, [("Accept-Encoding", "identity")])
    assert identity.status == 200 and "content-encoding" not in identity.headers and len(identity.body) > 1024
    headers = [] if accept_encoding is None else [("Accept-Encoding", accept_encoding)]
    response = raw_get(session_server.port, target, headers)
    assert response.status == 200
    assert int(response.headers["content-length"]) == len(response.body)
    if gzipped:
        assert response.headers.get("content-encoding") == "gzip", (accept_encoding, response.headers)
        assert len(response.body) < len(identity.body)
        assert gzip.decompress(response.body) == identity.body
    else:
        assert "content-encoding" not in response.headers, (accept_encoding, response.headers)
        assert response.body == identity.body
    assert response.headers["content-type"] == identity.headers["content-type"]


def test_gzip_and_identity_representations_have_distinct_strong_etags(session_server):
    """RFC 9110 §8.8.3: a strong entity tag for a content-encoded representation has to be distinct
    from the entity tag of the unencoded one (else caches and range requests can mix the two)."""
    target = "/api/m365/export?format=csv"
    plain = raw_get(session_server.port, target, [("Accept-Encoding", "identity")])
    packed = raw_get(session_server.port, target, [("Accept-Encoding", "gzip")])
    assert packed.headers.get("content-encoding") == "gzip" and plain.body != packed.body
    etags = (plain.headers["etag"], packed.headers["etag"])
    assert etags[0] != etags[1] or etags[0].startswith("W/"), (
        f"BUG: GET {target} sends the same strong ETag {etags[0]} for the identity body ({len(plain.body)} bytes) "
        f"and the gzip body ({len(packed.body)} bytes); expected distinct strong ETags (e.g. a '-gzip' suffix) "
        f"or a weak ETag")


@pytest.mark.parametrize("target, headers, status", [
    (SUMMARY, [], 200),
    ("/api/m365/users", [], 400),
    ("/api/m365/users?org=nobody", [], 404),
    ("/api/m365/nope", [], 404),
    ("/api/m365/export?format=xml", [], 400),
])
def test_cors_allow_origin_on_successes_and_errors(session_server, target, headers, status):
    response = raw_get(session_server.port, target, [("Origin", "https://dashboard.example"), *headers])
    assert response.status == status
    assert response.headers.get("access-control-allow-origin") == "*"
    if status >= 400:
        assert response.headers.get("cache-control") == "no-store", "errors must not be cached"


# -- 3. HTTPS --------------------------------------------------------------------------------------

def test_https_serves_the_api_with_the_given_certificate_and_plain_http_gets_no_data(
        published, start_server, tmp_path):
    cert, key = make_certificate(tmp_path)
    served = start_server(published.data_dir, "--certfile", str(cert), "--keyfile", str(key), scheme="https")
    response = requests.get(served.base_url + SUMMARY, verify=str(cert), timeout=10)
    assert response.status_code == 200
    expected = (current_version_dir(export_dir(published.data_dir)) / "summary.json").read_bytes()
    assert response.content == expected
    assert response.headers["etag"] and response.headers["access-control-allow-origin"] == "*"
    assert requests.get(served.base_url + "/api/m365/nope", verify=str(cert), timeout=10).status_code == 404
    with pytest.raises(requests.exceptions.SSLError):  # and it really is TLS: an unknown CA is refused
        requests.get(served.base_url + SUMMARY, timeout=10)

    # Plain HTTP to the TLS port: a TLS alert or a close, never the data.
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(request_bytes(SUMMARY))
        received = b""
        try:
            while len(received) < 1 << 20 and (chunk := sock.recv(1 << 16)):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b'"success"' not in received and not received.startswith(b"HTTP/1.1 200"), received[:200]
    assert requests.get(served.base_url + SUMMARY, verify=str(cert), timeout=10).status_code == 200
    assert "Traceback" not in served.log_path.read_text()


def run_serve(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SERVE, "--data-dir", str(data_dir), *args], capture_output=True, check=False, text=True,
                          timeout=30)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, f"not a one-line message: {result.stderr!r}"
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_certificate_exits_2_with_one_line_naming_the_file(published, tmp_path):
    missing = tmp_path / "missing.pem"
    result = run_serve("--port", str(free_port()), "--certfile", str(missing), "--keyfile", str(missing),
                       data_dir=published.data_dir)
    assert_one_line_error(result, str(missing))


def test_garbage_certificate_exits_2_with_one_line_naming_the_file(published, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    result = run_serve("--port", str(free_port()), "--certfile", str(garbage), "--keyfile", str(garbage),
                       data_dir=published.data_dir)
    assert_one_line_error(result, str(garbage))


def test_certificate_with_a_key_that_does_not_match_exits_2_naming_both(published, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, _ = make_certificate(tmp_path / "a")
    _, other_key = make_certificate(tmp_path / "b")
    result = run_serve("--port", str(free_port()), "--certfile", str(cert), "--keyfile", str(other_key),
                       data_dir=published.data_dir)
    assert_one_line_error(result, str(cert), str(other_key))


def test_taken_port_exits_2_with_one_line_saying_already_in_use(published):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_serve("--port", str(port), data_dir=published.data_dir)
    assert_one_line_error(result, "already in use", str(port))


# -- 4. clean shutdown and the access log ----------------------------------------------------------

def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def access_lines(log_path: Path) -> list[tuple[str, str, int]]:
    return [(m["method"], m["path"], int(m["status"]))
            for line in log_path.read_text(errors="replace").splitlines() if (m := ACCESS_LINE.match(line))]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_within_seconds_with_code_0_and_releases_the_port(
        published, start_server, sig):
    served = start_server(published.data_dir)
    idle = requests.Session()  # a browser-like idle keep-alive connection must not hold up shutdown
    assert idle.get(served.base_url + SUMMARY, timeout=10).status_code == 200
    workers = child_pids(served.process.pid)
    assert workers, "granian runs its workers as child processes"
    started = time.monotonic()
    served.process.send_signal(sig)
    try:
        code = served.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"m365-serve still running 10 s after {sig.name}") from None
    took = time.monotonic() - started
    idle.close()
    log = served.log_path.read_text(errors="replace")
    assert code == 0, f"exit code {code} after {sig.name}:\n{log[-2000:]}"
    assert took < 5, f"shutdown took {took:.1f} s"
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-2000:]
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in workers), f"worker processes {workers} outlived the server"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", served.port), timeout=2).close()
    with socket.socket() as probe:  # the port can be listened on again (as m365-serve's own check does it)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", served.port))
        probe.listen()


def test_access_log_has_one_line_per_request_with_method_path_and_status(published, start_server):
    served = start_server(published.data_dir)
    etag = requests.get(served.base_url + SUMMARY, timeout=10).headers["etag"]
    requests.head(served.base_url + "/api/m365/export", params={"format": "csv"}, timeout=10)
    requests.get(served.base_url + "/api/m365/nope", timeout=10)
    requests.post(served.base_url + SUMMARY, data=b"x", timeout=10)
    requests.get(served.base_url + "/api/m365/users", timeout=10)
    requests.get(served.base_url + SUMMARY, headers={"If-None-Match": etag}, timeout=10)
    requests.options(served.base_url + SUMMARY, timeout=10)
    requests.get(served.base_url + "/api/m365/users", params={"org": "secret name"}, timeout=10)
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=10)
    assert access_lines(served.log_path) == [
        ("GET", SUMMARY, 200), ("HEAD", "/api/m365/export", 200), ("GET", "/api/m365/nope", 404),
        ("POST", SUMMARY, 405), ("GET", "/api/m365/users", 400), ("GET", SUMMARY, 304),
        ("OPTIONS", SUMMARY, 204), ("GET", "/api/m365/users", 404),
    ], served.log_path.read_text()


def test_access_log_lines_cannot_be_forged_with_encoded_control_characters(published, start_server):
    served = start_server(published.data_dir)
    forged = '[2020-01-01 00:00:00 +0000] 127.0.0.1 "GET /forged HTTP/1.1" 200 0.1ms'
    target = "/api/m365/x%0d%0a" + quote(forged, safe="/:[]") + "%0a%1b[2J"
    assert_json_error(raw_get(served.port, target), {404}, target)
    assert raw_get(served.port, SUMMARY).status == 200
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=10)
    log = served.log_path.read_text(errors="replace")
    lines = access_lines(served.log_path)
    assert len(lines) == 2 and ("GET", "/forged", 200) not in lines and "\x1b" not in log, (
        f"BUG: GET {target} (percent-encoded CR/LF/ESC in the path) is written to the access log decoded, "
        f"so a client can forge access-log lines and inject terminal escapes; expected one escaped line per "
        f"request. Access lines parsed: {lines}\nlog:\n{log[-1500:]!r}")


# -- 5. atomic swap under load ---------------------------------------------------------------------

def write_version(root: Path, label: str, records: int) -> bytes:
    """A complete version written directly: summary, one users file, all six exports. Returns the summary."""
    writer = VersionWriter(root)
    org = f"Swap Org {label} / ü"
    rows = [{"organization_name": org, "user_principal_name": f"u{i}@{label}.example", "display_name": f"U {i}",
             "licenses": "Microsoft 365 Business Premium", "has_email_license": True} for i in range(records)]
    summary = json_bytes({
        "status": "success",
        "organizations": [{"organization_name": org, "es_user_count": records, "m365_licensed_user_count": records}],
        "totals": {"total_organizations": 1, "total_es_users": records, "total_m365_licensed_users": records},
        "last_collected": "2026-01-21T00:00:00Z", "metadata": {"query_time_ms": 0, "label": label},
    })
    writer.write_bytes("summary", "summary.json", summary, CONTENT_TYPES["json"])
    writer.add_organization(org, json_bytes({"status": "success", "organization": org,
                                             "users": [{k: v for k, v in r.items() if k != "organization_name"}
                                                       for r in rows], "total_users": records}))
    for sort in SORT_FIELDS:
        writer.write_bytes(f"export:json:{sort}", export_file_name(sort, "json"), json_bytes(
            {"status": "success", "data": rows, "total_records": records, "last_collected": "2026-01-21T00:00:00Z"}),
            CONTENT_TYPES["json"])
        csv_body = "organization_name,user_principal_name,display_name,licenses,has_email_license\n" + "".join(
            f'"{org}",{r["user_principal_name"]},{r["display_name"]},{r["licenses"]},true\n' for r in rows)
        writer.write_bytes(f"export:csv:{sort}", export_file_name(sort, "csv"), csv_body.encode(),
                           CONTENT_TYPES["csv"])
    writer.commit({"last_collected": "2026-01-21T00:00:00Z", "totals": {"total_organizations": 1}})
    return summary


def test_a_version_takes_an_earlier_versions_files_by_link_all_or_nothing(tmp_path):
    """What a sealed billing month's files rely on (assets/billing.py): linked with their ETag and gzip twin,
    never written through, and nothing taken when one of them is missing."""
    root = tmp_path / "export"
    write_version(root, "one", 40)
    previous = current_version_dir(root)
    entries = json.loads((previous / MANIFEST).read_bytes())["files"]
    taken = {key: entries[key] for key in ("summary", "export:json:organization_name")}
    assert "gzip_path" in taken["export:json:organization_name"] and "gzip_path" not in taken["summary"]

    writer = VersionWriter(root)
    assert writer.link(previous, taken)
    writer.commit({"last_collected": "2026-01-22T00:00:00Z"})
    linked = PublishedVersion(current_version_dir(root))
    for key, entry in taken.items():
        assert linked.files[key].etag == entry["etag"]
        for name in filter(None, (entry["path"], entry.get("gzip_path"))):
            assert (linked.path / name).stat().st_ino == (previous / name).stat().st_ino
            assert (linked.path / name).read_bytes() == (previous / name).read_bytes()

    partial = VersionWriter(root)
    missing = {**taken, "gone": {**taken["summary"], "path": "no-such-file.json"}}
    assert not partial.link(previous, missing)
    assert partial.files == {}
    assert not any(path.is_file() for path in partial.path.rglob("*") if path.name != ".writer-pid")
    partial.abandon()


@pytest.mark.slow
def test_publishing_under_load_serves_only_whole_versions_and_ends_on_the_newest(
        published, start_server, start_simulator, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(published.data_dir, data_dir, symlinks=True)
    root = export_dir(data_dir)
    summaries = [(current_version_dir(root) / "summary.json").read_bytes()]
    served = start_server(data_dir)

    max_requests, deadline = 10_000, time.monotonic() + 60
    budget = itertools.count()
    budget_lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []
    seen_summaries: dict[bytes, int] = {}
    seen_lock = threading.Lock()

    def load(worker: int) -> int:
        done = 0
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                with budget_lock:
                    if next(budget) >= max_requests:
                        break
                export = (worker + done) % 2 == 1
                url = served.base_url + ("/api/m365/export?format=json" if export else SUMMARY)
                try:
                    response = session.get(url, timeout=10)
                    body = response.content
                    assert response.status_code == 200, f"{response.status_code} {body[:200]!r}"
                    # the validators and the body come from one version
                    # (the gzip representation's ETag is the identity one's plus "-gzip")
                    etag = response.headers["etag"].replace('-gzip"', '"')
                    assert etag == f'"{hashlib.sha256(body).hexdigest()[:32]}"', "ETag/body mix"
                    if export:
                        doc = json.loads(body)
                        assert doc["status"] == "success" and doc["total_records"] == len(doc["data"]), "export"
                    else:
                        json.loads(body)
                        with seen_lock:
                            seen_summaries[body] = seen_summaries.get(body, 0) + 1
                except Exception as exc:  # every failed request is a finding
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
                done += 1
                time.sleep(0.01)  # ~600 requests/s in all: the budget outlasts a slow pipeline run
        return done

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(load, i) for i in range(8)]
        try:
            time.sleep(0.3)
            sim = start_simulator(orgs=12, users_per_org=10, seed=4242)
            run_pipeline(sim, data_dir)  # the real export asset publishes version 2
            summaries.append((current_version_dir(root) / "summary.json").read_bytes())
            time.sleep(0.3)
            summaries.append(write_version(root, "three", 40))
            time.sleep(0.3)
            summaries.append(write_version(root, "four", 60))
            time.sleep(0.3)
        finally:
            stop.set()
        counts = [f.result(timeout=30) for f in futures]

    assert not failures, f"{len(failures)} of {sum(counts)} requests failed during the swaps: {failures[:5]}"
    assert len(set(summaries)) == 4, "the test must publish four different versions"
    assert sum(counts) < max_requests and time.monotonic() < deadline, "load ended before the publishing did"
    unknown = [body[:200] for body in seen_summaries if body not in summaries]
    assert not unknown, f"summaries that are no published version (a mix or a half-written file): {unknown}"
    assert len(seen_summaries) >= 3, f"the load must span the swaps; saw {len(seen_summaries)} versions"
    final = requests.get(served.base_url + SUMMARY, timeout=10)
    assert final.content == summaries[-1], "the server must serve the newest version without a restart"
    export = requests.get(served.base_url + "/api/m365/export", timeout=10).json()
    assert export["total_records"] == len(export["data"]) == 60
    assert served.process.poll() is None


# -- 6. arbitrary organization names ---------------------------------------------------------------

FRAGMENTS = ["/", "..", "../", "..\\", "%", "%2e", "%2F", "%00", "?", "#", "&", "=", "+", ";", '"', "'", "\\",
             "\x00", "<script>", " ", "\t", "\r\n", "日本", "Ωμέγα", "Ромашка", "\u200b", "\ufeff", "😀",
             "manifest.json"]
# Every non-empty name must work: the server strips nothing, so the only filter is "not empty" (an
# empty org is the documented 400). characters(codec="utf-8") leaves out lone surrogates, which no
# UTF-8 query string can carry.
ORG_NAMES = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)),
    min_size=1, max_size=30,
).map("".join).filter(lambda name: 1 <= len(name) <= 200)
# What a version directory may hold: the manifest, the summary, users files named by a hex digest
# (never by the organization name) and one export per sort and format; each body possibly gzipped too.
EXPORT_FILES = "|".join(re.escape(export_file_name(sort, fmt)) for sort in SORT_FIELDS for fmt in FORMATS)
ALLOWED_FILE = re.compile(rf"{re.escape(MANIFEST)}|(summary\.json|users/[0-9a-f]{{40}}\.json|{EXPORT_FILES})(\.gz)?")


def test_any_organization_name_round_trips_and_files_stay_inside_export(start_server, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    root = export_dir(data_dir)
    served = start_server(data_dir)
    nothing = raw_get(served.port, SUMMARY)  # before the first publication: the documented 404
    assert_json_error(nothing, {404}, "nothing published")
    examples = itertools.count()

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(names=st.lists(ORG_NAMES, min_size=1, max_size=5, unique=True))
    def check(names: list[str]) -> None:
        next(examples)
        writer = VersionWriter(root)
        bodies = {}
        for name in names:
            bodies[name] = json_bytes({"status": "success", "organization": name,
                                       "users": [{"user_principal_name": "a@b.example", "display_name": name[:20],
                                                  "licenses": "", "has_email_license": False}] * 60,
                                       "total_users": 60})
            writer.add_organization(name, bodies[name])
        writer.write_bytes("summary", "summary.json", json_bytes({"status": "success", "organizations": [
            {"organization_name": n, "es_user_count": 0, "m365_licensed_user_count": 60} for n in names]}),
            CONTENT_TYPES["json"])
        for sort in SORT_FIELDS:
            for fmt in FORMATS:
                writer.write_bytes(f"export:{fmt}:{sort}", export_file_name(sort, fmt), b"{}", CONTENT_TYPES[fmt])
        version = writer.commit({"last_collected": None, "totals": {}})

        export_root = root.resolve()
        for path in version.rglob("*"):
            assert path.resolve().is_relative_to(export_root), f"{path} escapes {export_root}"
            if path.is_file():
                assert ALLOWED_FILE.fullmatch(path.relative_to(version).as_posix()), path
        assert {p.name for p in data_dir.iterdir()} == {root.name}, list(data_dir.iterdir())
        assert {p.name for p in root.iterdir()} <= {CURRENT, VERSIONS}, list(root.iterdir())

        for name in names:
            response = requests.get(served.base_url + "/api/m365/users", params={"org": name},
                                    headers={"Accept-Encoding": "gzip"}, timeout=10)
            assert response.status_code == 200, (name, response.status_code, response.text[:200])
            assert response.json()["organization"] == name
            assert response.content == bodies[name]

    check()
    assert next(examples) >= 10, "hypothesis ran too few examples to mean anything"
    assert {p.name for p in tmp_path.iterdir()} <= {"data", f"serve-{served.port}.log"}
    assert_still_serving(served)
