"""Rule 17, who may read: tokens from a file of digests, HTTP Basic for the browser, CORS narrowed, and
no anonymous listener beyond loopback. Real ``m365-serve`` processes on 127.0.0.1; the page in Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from .helpers import BIN

CHALLENGE = 'Basic realm="m365-pipeline", charset="UTF-8"'
ENDPOINTS = ["/", "/static/dashboard.js", "/api/m365/summary", "/api/m365/export?format=csv",
             "/api/m365/users?org=x", "/api/m365/history", "/api/m365/changes", "/api/m365/nothing-here"]
ALLOWED_ORIGIN = "https://intranet.example"


def token_add(path: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "m365-serve"), "token", "add", name, "--tokens-file", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def new_token(path: Path, name: str) -> str:
    made = token_add(path, name)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


@pytest.fixture
def guarded(published, start_server, tmp_path):
    """A server with a tokens file of two tokens, and the allowed origin."""
    tokens_file = tmp_path / "tokens"
    alice, bob = new_token(tokens_file, "alice"), new_token(tokens_file, "bob-laptop")
    served = start_server(published.data_dir, "--tokens-file", str(tokens_file), "--cors-origin", ALLOWED_ORIGIN)
    return served, tokens_file, alice, bob


def assert_401(response: requests.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.status_code)
    assert response.headers["www-authenticate"] == CHALLENGE
    assert response.headers["content-type"] == "application/json"
    if response.request.method == "HEAD":
        return
    body = response.json()
    assert body["status"] == "error" and set(body) == {"status", "error"} and body["error"]


def test_rule17_token_add_prints_the_token_once_and_the_file_holds_only_its_digest(tmp_path):
    tokens_file = tmp_path / "tokens"
    made = token_add(tokens_file, "billing")
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) >= 40, made.stdout  # the only line on stdout: the token
    token = lines[0]
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    text = tokens_file.read_text()
    assert token not in text and token not in made.stderr
    assert text == f"billing {hashlib.sha256(token.encode()).hexdigest()}\n"
    second = new_token(tokens_file, "other")
    assert second != token and second not in tokens_file.read_text()
    again = token_add(tokens_file, "billing")
    assert again.returncode == 2 and again.stdout == "" and "already has a token named billing" in again.stderr


def test_rule17_every_request_without_a_valid_token_is_a_401_with_the_basic_challenge(guarded):
    served, _, alice, _ = guarded
    wrong = ["Bearer not-a-token", "Bearer " + alice[:-1], "Basic " + base64.b64encode(b"alice:nope").decode(),
             "Basic " + base64.b64encode(alice.encode() + b":").decode(),  # the token as the user name, no password
             "Basic !!!", "Token " + alice, alice, "Bearer"]
    for path in ENDPOINTS:
        assert_401(requests.get(served.base_url + path, timeout=5))
        for authorization in wrong:
            assert_401(requests.get(served.base_url + path, headers={"Authorization": authorization}, timeout=5))
    assert_401(requests.head(served.base_url + "/api/m365/summary", timeout=5))
    assert_401(requests.post(served.base_url + "/api/m365/summary", timeout=5))  # a token first, then the 405
    assert requests.post(served.base_url + "/api/m365/summary", timeout=5,
                         headers={"Authorization": f"Bearer {alice}"}).status_code == 405


def test_rule17_bearer_and_basic_with_any_user_name_read_what_anonymous_loopback_serves(guarded, session_server):
    served, _, alice, bob = guarded
    for path in ["/", "/api/m365/summary", "/api/m365/export?format=csv", "/api/m365/history"]:
        expected = requests.get(session_server.base_url + path, timeout=5)
        assert expected.status_code == 200
        for auth in [{"headers": {"Authorization": f"Bearer {alice}"}}, {"headers": {"Authorization": f"bearer {bob}"}},
                     {"auth": ("anyone", alice)}, {"auth": ("", bob)}]:
            answer = requests.get(served.base_url + path, timeout=5, **auth)
            assert answer.status_code == 200 and answer.content == expected.content, (path, auth)


def test_rule17_a_token_added_while_serving_is_in_force_and_tokens_never_reach_the_log(guarded):
    served, tokens_file, alice, bob = guarded
    carol = new_token(tokens_file, "carol")
    deadline = time.monotonic() + 10
    while requests.get(served.base_url + "/api/m365/summary", auth=("x", carol), timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "a token added while serving was never accepted"
        time.sleep(0.2)
    for token in (alice, bob):
        requests.get(served.base_url + "/api/m365/summary", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    requests.get(served.base_url + "/api/m365/summary", headers={"Authorization": "Bearer wrong-token-value"},
                 timeout=5)
    time.sleep(0.5)
    log = served.log_path.read_text()
    assert log.count('"GET /api/m365/summary" 200') >= 3, log
    for secret in (alice, bob, carol, "wrong-token-value", base64.b64encode(f"x:{carol}".encode()).decode()):
        assert secret not in log


def test_rule17_preflight_needs_no_token_and_cors_echoes_only_the_allowed_origin(guarded):
    served, _, alice, _ = guarded
    summary = served.base_url + "/api/m365/summary"
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    allowed = requests.options(summary, headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=5)
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "Origin" in allowed.headers["vary"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    foreign = requests.options(summary, headers={"Origin": "https://evil.example", **preflight}, timeout=5)
    assert foreign.status_code == 204 and "access-control-allow-origin" not in foreign.headers
    bearer = {"Authorization": f"Bearer {alice}"}
    read = requests.get(summary, headers={"Origin": ALLOWED_ORIGIN, **bearer}, timeout=5)
    assert read.status_code == 200 and read.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "Origin" in read.headers["vary"] and "Accept-Encoding" in read.headers["vary"]
    for origin in ["https://evil.example", "null", ALLOWED_ORIGIN + ".evil.example", "http://intranet.example"]:
        refused = requests.get(summary, headers={"Origin": origin, **bearer}, timeout=5)
        assert "access-control-allow-origin" not in refused.headers, origin
    assert "access-control-allow-origin" not in requests.get(summary, headers=bearer, timeout=5).headers


def test_rule17_without_tokens_cors_stays_open(session_server):
    answer = requests.get(session_server.base_url + "/api/m365/summary", headers={"Origin": "https://a.example"},
                          timeout=5)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "m365-serve"), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "server.example"])
def test_rule17_no_anonymous_listener_beyond_loopback_and_the_message_names_both_options(published, host):
    refused = _serve("--host", host, "--port", "1", "--data-dir", str(published.data_dir))
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("m365-serve: error: ")
    assert "--tokens-file" in message and "--allow-anonymous" in message and host in message, message


def test_rule17_the_default_listener_is_loopback_only(published, start_server):
    served = start_server(published.data_dir)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # this machine's address on its network
        probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        own = probe.getsockname()[0]
    assert requests.get(served.base_url + "/api/m365/summary", timeout=5).status_code == 200
    if own.startswith("127."):
        pytest.skip("no address but loopback on this machine")
    with pytest.raises(OSError):
        socket.create_connection((own, served.port), timeout=2).close()
    shown = _serve("--help").stdout
    assert re.search(r"--host HOST\s+address to listen on \(default: 127\.0\.0\.1\)", shown), shown


def test_rule17_a_tokens_file_holding_a_token_or_nothing_is_refused_without_quoting_it(published, tmp_path):
    tokens_file = tmp_path / "tokens"
    token = new_token(tokens_file, "alice")
    leaked = tmp_path / "leaked"
    good = f"alice {hashlib.sha256(token.encode()).hexdigest()}\n"
    for text in [f"{token}\n", f"alice {token}\n", f"{good}bob {token}\n"]:
        leaked.write_text(text)
        refused = _serve("--tokens-file", str(leaked), "--port", "1", "--data-dir", str(published.data_dir))
        assert refused.returncode == 2 and "m365-serve token add" in refused.stderr, refused.stderr
        assert "SHA-256" in refused.stderr and token not in refused.stderr
    leaked.write_text("# nobody yet\n")
    refused = _serve("--tokens-file", str(leaked), "--port", "1", "--data-dir", str(published.data_dir))
    assert refused.returncode == 2 and "holds no token" in refused.stderr
    missing = _serve("--tokens-file", str(tmp_path / "absent"), "--port", "1", "--data-dir", str(published.data_dir))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_rule17_the_tokens_file_variable_is_read_and_cors_origin_needs_tokens(published, tmp_path, monkeypatch):
    refused = _serve("--cors-origin", ALLOWED_ORIGIN, "--port", "1", "--data-dir", str(published.data_dir))
    assert refused.returncode == 2 and "--cors-origin" in refused.stderr and "--tokens-file" in refused.stderr
    monkeypatch.setenv("M365_SERVE_TOKENS_FILE", str(tmp_path / "absent"))
    from_variable = _serve("--port", "1", "--data-dir", str(published.data_dir))
    assert from_variable.returncode == 2 and str(tmp_path / "absent") in from_variable.stderr


# -- the dashboard behind tokens, in Chromium -------------------------------------------------

@contextmanager
def _blank_site() -> Iterator[str]:
    """Another origin on 127.0.0.1: an empty page, as any site a colleague opens."""
    class Blank(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>elsewhere</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")
def test_rule17_the_page_and_its_csv_download_work_with_the_browsers_basic_credentials(guarded, session_server):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    from .test_dashboard_page import CHROMIUM_ARGS

    served, _, alice, _ = guarded
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            anonymous = browser.new_context()  # headless, so the browser's prompt is answered with nothing
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                anonymous.new_page().goto(served.base_url + "/")
            anonymous.close()
            context = browser.new_context(accept_downloads=True, http_credentials={"username": "billing",
                                                                                  "password": alice})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(served.base_url + "/")
            expect(page.locator("#content")).to_be_visible(timeout=10_000)
            expected = json.loads(requests.get(session_server.base_url + "/api/m365/summary", timeout=5).content)
            first = expected["organizations"][0]["organization_name"]
            expect(page.locator("#org-rows button.org-link", has_text=first).first).to_be_visible()
            with page.expect_download() as info:
                page.get_by_role("link", name="Export to CSV").click()
            body = Path(info.value.path()).read_bytes()
            # The page fetches it with the browser's credentials and saves it after a UTF-8 BOM (issue 26).
            assert body == b"\xef\xbb\xbf" + requests.get(session_server.base_url + "/api/m365/export?format=csv",
                                                          timeout=5).content
            assert errors == []
            # A page of another origin, in the same browser with the credentials: it cannot read the API.
            foreign = context.new_page()
            with _blank_site() as other:
                foreign.goto(other + "/")
                outcome = foreign.evaluate("""(url) => Promise.all(['include', 'omit'].map((credentials) =>
                    fetch(url, {credentials}).then((r) => r.text()).then((t) => 'read ' + t.length)
                        .catch((e) => 'blocked ' + e.name)))""", served.base_url + "/api/m365/export?format=csv")
            assert outcome == ["blocked TypeError", "blocked TypeError"], outcome
            context.close()
        finally:
            browser.close()


# -- the pure parts, case by case ----------------------------------------------------------------

@pytest.mark.parametrize(("authorization", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("  Bearer   abc  ", "abc"),
    ("Basic " + base64.b64encode(b"user:abc").decode(), "abc"),
    ("Basic " + base64.b64encode(b":abc").decode(), "abc"),  # any user name, also none
    ("Basic " + base64.b64encode(b"user:a:b").decode(), "a:b"),  # a colon belongs to the password
    ("Basic " + base64.b64encode("usér:pässwört".encode()).decode(), "pässwört"),
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Token abc", None), ("abc", None),
    ("Basic " + base64.b64encode(b"abc").decode(), None),  # no colon: no password
    ("Basic " + base64.b64encode(b"user:").decode(), None), ("Basic !!!", None),
    ("Basic " + base64.b64encode(b"\xff:\xfe").decode(), None),
])
def test_rule17_the_token_presented(authorization, token):
    from m365_pipeline.server.access import presented_token

    assert presented_token(authorization) == token


@pytest.mark.parametrize(("text", "error"), [
    ("alice\n", "is not `NAME SHA256HEX`"),
    ("alice qofqGZ0CBpPwbKX7wnid6Fxr_kxUcWTr7U6JJAlKf3s\n", "is not `NAME SHA256HEX`"),
    (f"alice {'a' * 63}\n", "is not `NAME SHA256HEX`"),
    (f"alice {'a' * 64} extra\n", "is not `NAME SHA256HEX`"),
    (f"al/ice {'a' * 64}\n", "the name must be"),
    (f"alice {'a' * 64}\nalice {'b' * 64}\n", "repeats a name or a token"),
    (f"alice {'a' * 64}\nbob {'A' * 64}\n", "repeats a name or a token"),
])
def test_rule17_a_bad_tokens_file_line_is_named_and_never_quoted(text, error, tmp_path):
    from m365_pipeline.server.access import TokensFileError, parse_tokens

    with pytest.raises(TokensFileError, match=re.escape(error)) as raised:
        parse_tokens(text, tmp_path / "tokens")
    assert "qofqGZ0" not in str(raised.value) and "aaaa" not in str(raised.value)


def test_rule17_a_tokens_file_with_comments_and_blank_lines():
    from m365_pipeline.server.access import parse_tokens

    text = f"# who may read\n\nalice {'a' * 64}  # laptop\n  bob-2 {'B' * 64}\n"
    assert parse_tokens(text, Path("tokens")) == {"a" * 64: "alice", "b" * 64: "bob-2"}
