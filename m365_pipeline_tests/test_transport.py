"""The vendor clients' HTTP (aiohttp): every way an answer can be framed or broken, over real sockets.

A scripted vendor on 127.0.0.1 answers each request with exact bytes (chunked, gzip, read-until-close,
trickled, garbage), so every way an answer can be framed is exercised through the real client.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.resources.http import (
    MalformedResponseError,
    VendorError,
    VendorUnavailableError,
    VendorUnreachableError,
)

from .helpers import FAST_HTTP, make_certificate

BODY = {"items": [{"id": "u-1", "name": "Zoë"}], "n": 2**70}  # an integer past 64 bits stays exact
JSON = json.dumps(BODY).encode()

# What the scripted vendor does with one connection: read requests from it, write answers.
Script = Callable[[socket.socket, "Vendor"], None]


class Vendor:
    """A loopback server whose every accepted connection runs ``script``; it counts connections and requests."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._server.getsockname()[1]}/api"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                if self.tls is not None:
                    connection = self.tls.wrap_socket(connection, server_side=True)
                self.script(connection, self)
            except OSError:
                pass

    def read_request(self, connection: socket.socket) -> bytes | None:
        """One request's head (GETs carry no body), or None when the client closed the connection."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        self.requests.append(data)
        return data

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def vendor() -> Iterator[Callable[[Script], Vendor]]:
    vendors: list[Vendor] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> Vendor:
        vendors.append(Vendor(script, tls))
        return vendors[-1]

    yield start
    for started in vendors:
        started.close()


def answer(status: int = 200, body: bytes = JSON, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keep_answering(*frames: bytes) -> Script:
    """Answer every request on the connection with ``frames`` (written one by one)."""
    def script(connection: socket.socket, vendor: Vendor) -> None:
        while vendor.read_request(connection) is not None:
            for frame in frames:
                connection.sendall(frame)
    return script


class Client:
    """A vendor client driven from a test's plain code: its session on one uvloop loop, as ``run_pull`` gives."""

    def __init__(self, vendor_client: Any) -> None:
        self.client = vendor_client
        self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)

    def __enter__(self) -> Client:
        self.run(self.client.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.client.__aexit__())
        self._runner.close()

    def run(self, coroutine: Any) -> Any:
        return self._runner.run(coroutine)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.run(self.client.get_json(path, **kwargs))


def client(url: str, **settings: Any) -> Client:
    return Client(SaasApiResource(base_url=url, token="secret-token-123", **{**FAST_HTTP, **settings}).client())


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("frames", [
    pytest.param([answer()], id="content-length"),
    pytest.param([answer(200, chunked(JSON), "Transfer-Encoding: chunked")], id="chunked"),
    pytest.param([answer(200, gzip.compress(JSON), "Content-Encoding: gzip")], id="gzip"),
    pytest.param([answer(200, chunked(gzip.compress(JSON)), "Transfer-Encoding: chunked",
                         "Content-Encoding: gzip")], id="chunked-gzip"),
    pytest.param([answer()[:5], answer()[5:40], answer()[40:]], id="split-mid-header"),
])
def test_an_answer_is_read_whole_however_it_is_framed(vendor, frames):
    served = vendor(keep_answering(*frames))
    with client(served.url) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY  # and the connection stays usable after it
    assert served.connections == 1


def test_an_answer_without_length_is_read_until_the_vendor_closes_the_connection(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + JSON)
    served = vendor(script)
    with client(served.url) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY  # on a new connection: that one was closed
    assert served.connections == 2


def test_calls_reuse_one_kept_alive_connection(vendor):
    served = vendor(keep_answering(answer()))
    with client(served.url) as c:
        for _ in range(25):
            c.get_json("/users")
    assert served.connections == 1 and len(served.requests) == 25


def test_a_connection_the_vendor_closed_while_idle_is_not_reused(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        connection.sendall(answer())
        # ...then the vendor's keep-alive timeout ends the connection before the next request.
    served = vendor(script)
    with client(served.url, max_retries=0) as c:
        assert c.get_json("/users") == BODY
        time.sleep(0.2)
        assert c.get_json("/users") == BODY  # with no retries allowed: a fresh connection at once
    assert served.connections == 2


def test_a_kept_alive_connection_closed_as_it_is_reused_is_sent_again_without_spending_a_retry(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        connection.sendall(answer())
        if vendor.connections == 1:
            vendor.read_request(connection)  # the vendor closes instead of answering, as a keep-alive race does
            connection.shutdown(socket.SHUT_RDWR)
            return
        while vendor.read_request(connection) is not None:
            connection.sendall(answer())
    served = vendor(script)
    with client(served.url, max_retries=0) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY  # no retries allowed: sent again on a new connection
    assert served.connections == 2 and len(served.requests) == 3


def test_an_interim_answer_is_skipped_for_the_final_one(vendor):
    served = vendor(keep_answering(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n", answer()))
    with client(served.url, max_retries=0) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY  # the next request gets its own answer, not a late one
    assert served.connections == 1


def test_bytes_no_request_asked_for_end_the_connection(vendor):
    # Two answers to one request, in one write (arriving later, they would be taken for the next request's,
    # as with any HTTP/1.1 client: answers carry no request id).
    served = vendor(keep_answering(answer() + answer(body=b'{"stray": true}')))
    with client(served.url, max_retries=0) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY  # not the stray answer: that connection was dropped
    assert served.connections == 2


def test_a_slow_but_steady_answer_is_not_cut_off_by_the_read_timeout(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        body = chunked(JSON, size=8)
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        step = len(body) // 5 + 1
        for i in range(0, len(body), step):
            time.sleep(0.15)  # 5 pauses of 0.15 s: 0.75 s in all, each under the 0.4 s read timeout
            connection.sendall(body[i:i + step])
    served = vendor(script)
    with client(served.url, timeout_s=0.4, max_retries=0) as c:
        assert c.get_json("/users") == BODY


def test_an_answer_that_stalls_times_out_and_is_tried_again(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        connection.sendall(answer()[:30])
        time.sleep(2)
    served = vendor(script)
    with client(served.url, timeout_s=0.2, max_retries=2) as c, \
            pytest.raises(VendorUnavailableError, match=r"timed out after 3 attempts of 0.2 s each"):
        c.get_json("/users")
    assert len(served.requests) == 3


def test_a_kept_alive_connection_that_stalls_on_a_later_answer_times_out_too(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        vendor.read_request(connection)
        connection.sendall(answer())
        vendor.read_request(connection)
        time.sleep(2)  # the second answer never comes
    served = vendor(script)
    with client(served.url, timeout_s=0.3, max_retries=0) as c:
        assert c.get_json("/users") == BODY
        time.sleep(0.1)
        # "timed out", not "Server disconnected": the read timeout fired before the vendor gave up at 2 s.
        with pytest.raises(VendorUnavailableError, match="timed out"):
            c.get_json("/users")


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"\x00\xff" * 40])
def test_an_answer_that_is_not_http_is_tried_again_then_fails_saying_so(vendor, garbage):
    served = vendor(keep_answering(garbage))
    with client(served.url, max_retries=1) as c, pytest.raises(VendorUnavailableError) as failure:
        c.get_json("/users")
    assert "not valid HTTP" in str(failure.value) and "GET /users" in str(failure.value)
    assert len(served.requests) == 2


def test_a_gzip_answer_that_does_not_decompress_is_reported_not_landed(vendor):
    served = vendor(keep_answering(answer(200, b"not gzip at all", "Content-Encoding: gzip")))
    with client(served.url, max_retries=0) as c, pytest.raises(VendorError, match="Content-Encoding"):
        c.get_json("/users")


def test_a_vendor_that_closes_mid_answer_is_tried_again(vendor):
    calls = []

    def script(connection: socket.socket, vendor: Vendor) -> None:
        while vendor.read_request(connection) is not None:
            calls.append(1)
            if len(calls) == 1:
                connection.sendall(answer()[:-10])  # a truncated first answer, then the connection ends
                return
            connection.sendall(answer())
    served = vendor(script)
    with client(served.url, max_retries=1) as c:
        assert c.get_json("/users") == BODY
    assert served.connections == 2


@pytest.mark.parametrize("token", ["abc\r\nX-Evil: 1", "abc\n", "abc\x00", "naïve-€"])
def test_a_configured_token_that_would_split_the_request_is_refused_before_anything_is_sent(vendor, token):
    served = vendor(keep_answering(answer()))
    resource = SaasApiResource(base_url=served.url, token=token, **FAST_HTTP)
    with pytest.raises(VendorError, match="SAAS_API_TOKEN") as failure:
        resource.client()
    assert token.strip() not in str(failure.value) and served.connections == 0


def test_a_vendor_token_with_a_line_break_is_not_sent_and_the_call_says_where(vendor):
    served = vendor(keep_answering(answer()))
    backup = BackupApiResource(base_url=served.url, reseller_token="r", admin_token="a", **FAST_HTTP)
    with Client(backup.client()) as c, \
            pytest.raises(MalformedResponseError, match=r"GET /users/7/tenants") as failure:
        c.run(c.client.tenant_pages("7", "owner-token\r\nX-Injected: yes"))
    assert "owner-token" not in str(failure.value) and "X-Access-Token" in str(failure.value)
    assert not any(b"X-Injected" in request for request in served.requests)


def test_a_backup_admin_token_that_would_split_the_request_is_refused_naming_its_variable(vendor):
    served = vendor(keep_answering(answer()))
    backup = BackupApiResource(base_url=served.url, reseller_token="r", admin_token="adm\r\nX-Evil: 1", **FAST_HTTP)
    with pytest.raises(VendorError, match="BACKUP_ADMIN_TOKEN") as failure:
        backup.client()
    assert "adm" not in str(failure.value).replace("admin", "") and served.connections == 0


def test_the_request_carries_the_token_in_its_header_and_nowhere_else(vendor):
    served = vendor(keep_answering(answer()))
    with client(served.url) as c:
        c.get_json("/users/a%2Fb/subscriptions", params={"page_size": 10, "page_number": 1})
    head = served.requests[0].decode()
    line, *headers = head.split("\r\n")
    assert line == "GET /api/users/a%2Fb/subscriptions?page_size=10&page_number=1 HTTP/1.1"
    assert "Authorization: Bearer secret-token-123" in headers
    assert f"Host: {served.url.split('/')[2]}" in headers
    assert head.count("secret-token-123") == 1


@pytest.fixture
def tls_vendor(vendor, tmp_path) -> tuple[Vendor, str]:
    """A vendor over TLS with a certificate made by the test, and that certificate's path."""
    cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return vendor(keep_answering(answer()), tls=context), str(cert)


def test_an_https_vendor_is_called_over_tls_with_its_certificate_checked(tls_vendor, monkeypatch):
    served, cert = tls_vendor
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the test's own certificate, as a system store would
    with client(served.url.replace("127.0.0.1", "localhost")) as c:
        assert c.get_json("/users") == BODY
        assert c.get_json("/users") == BODY
    assert served.connections == 1


def test_a_vendor_certificate_that_is_not_trusted_fails_saying_why(tls_vendor):
    served, _ = tls_vendor
    with client(served.url, max_retries=0) as c, pytest.raises(VendorUnreachableError) as failure:
        c.get_json("/users")
    assert "certificate verify failed" in str(failure.value) and not served.requests


def test_a_trusted_certificate_for_another_host_name_is_refused(vendor, tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path, names="DNS:vendor.invalid")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    served = vendor(keep_answering(answer()), tls=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted, but issued to another name
    with client(served.url, max_retries=0) as c, pytest.raises(VendorUnreachableError) as failure:
        c.get_json("/users")
    assert "certificate verify failed" in str(failure.value) and not served.requests
