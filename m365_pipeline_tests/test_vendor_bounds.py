"""Rule 19 and issue 25's hostile vendor data, over real sockets: what a vendor sends is bounded and scrubbed.

The scripted vendor of test_transport.py answers with exact bytes: answers past the size cap (plain, chunked,
and a gzip bomb), error pages that echo our tokens back, malformed JSON, and lists whose pages never end.
"""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from m365_pipeline.resources import BackupApiResource
from m365_pipeline.resources.http import (
    MalformedResponseError,
    ResponseTooLargeError,
    VendorError,
    VendorUnavailableError,
)

from . import test_transport
from .helpers import FAST_HTTP
from .test_transport import Client, Vendor, answer, chunked, client, keep_answering

vendor = test_transport.vendor  # the scripted vendor fixture

TOKEN = "secret-token-123"  # test_transport's client token
MIB = 1024 * 1024
# 3 MiB of JSON that gzip squeezes to a few KiB: a cap of 1 MiB must stop it while inflating.
BOMB = gzip.compress(b'{"items": ["' + b"0" * (3 * MIB) + b'"]}', compresslevel=9)


def counting_script(frames: bytes):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        while vendor.read_request(connection) is not None:
            connection.sendall(frames)
    return script


@pytest.mark.parametrize("frames", [
    pytest.param(answer(200, b'{"x": "' + b"a" * (2 * MIB) + b'"}'), id="content-length-over-the-cap"),
    pytest.param(answer(200, chunked(b'{"x": "' + b"a" * (2 * MIB) + b'"}', size=64 * 1024),
                        "Transfer-Encoding: chunked"), id="chunked-over-the-cap"),
    pytest.param(answer(200, BOMB, "Content-Encoding: gzip"), id="gzip-bomb"),
    pytest.param(answer(200, chunked(BOMB, size=1024), "Transfer-Encoding: chunked", "Content-Encoding: gzip"),
                 id="chunked-gzip-bomb"),
])
def test_rule19_an_answer_past_the_size_cap_fails_its_call_naming_source_and_path_and_is_not_retried(vendor,
                                                                                                       frames):
    assert len(BOMB) < 64 * 1024  # the bomb itself is small: only inflating it crosses the cap
    served = vendor(counting_script(frames))
    with client(served.url, max_response_mib=1, max_retries=3) as c, \
            pytest.raises(ResponseTooLargeError) as failure:
        c.get_json("/users/u-1/subscriptions")
    message = str(failure.value)
    assert "source S" in message and "GET /users/u-1/subscriptions" in message and "1 MiB" in message
    assert TOKEN not in message and not failure.value.transient
    assert len(served.requests) == 1  # as large the next time: not retried


def test_rule19_an_answer_under_the_cap_is_read_whole_compressed_or_not(vendor):
    body = json.dumps({"items": ["a" * (MIB // 2)]}).encode()
    served = vendor(keep_answering(answer(200, gzip.compress(body), "Content-Encoding: gzip")))
    with client(served.url, max_response_mib=1) as c:
        assert c.get_json("/users") == json.loads(body)


@pytest.mark.parametrize("status", [400, 500, 404])
def test_rule19_an_error_page_echoing_our_token_reaches_the_message_scrubbed(vendor, status):
    echo = f"<h1>Bad</h1><pre>GET /users HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n</pre>".encode()
    served = vendor(keep_answering(answer(status, echo)))
    with client(served.url, max_retries=0) as c, pytest.raises(VendorError) as failure:
        c.get_json("/users")
    message = str(failure.value)
    assert TOKEN not in message and "Bearer [configured token]" in message and f"HTTP {status}" in message


def test_rule19_source_b_owner_tokens_learned_during_the_pull_are_scrubbed_from_what_the_vendor_echoes(vendor):
    owner_token = "owner-7-token-from-the-vendor"

    def script(connection: socket.socket, vendor: Vendor) -> None:
        while (request := vendor.read_request(connection)) is not None:
            if request.startswith(b"GET /api/users HTTP"):
                body = json.dumps([{"id": "7", "authentication_token": owner_token}]).encode()
                connection.sendall(answer(200, body))
            else:  # a debugging page that shows the request's headers
                connection.sendall(answer(400, b"you sent: " + request))
    served = vendor(script)
    backup = BackupApiResource(base_url=served.url, reseller_token="reseller-token-9", admin_token="admin-token-9",
                               **{**FAST_HTTP, "max_retries": 0})
    with Client(backup.client()) as c, pytest.raises(VendorError) as failure:
        _, owners = c.run(c.client.owners())
        c.run(c.client.tenant_pages("7", owners[0]["authentication_token"]))
    message = str(failure.value)
    assert "GET /users/7/tenants" in message and "X-Access-Token" in message
    for secret in (owner_token, "reseller-token-9", "admin-token-9"):
        assert secret not in message


@pytest.mark.parametrize("body", [b"not json at all", b'{"items": [1, 2', b"\xff\xfe{}", b'{"n": NaN}'])
def test_malformed_json_fails_at_once_and_is_not_retried_as_if_transient(vendor, body):
    served = vendor(keep_answering(answer(200, body)))
    with client(served.url, max_retries=3) as c, pytest.raises(MalformedResponseError) as failure:
        c.get_json("/users")
    assert "not valid JSON" in str(failure.value) and not failure.value.transient
    assert len(served.requests) == 1


def _pages_forever(total_pages: int):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        while vendor.read_request(connection) is not None:
            body = {"pagination": {"total_pages": total_pages, "total_items": 3}, "items": [{"id": "u"}]}
            connection.sendall(answer(200, json.dumps(body).encode()))
    return script


def test_a_user_list_claiming_a_billion_pages_stops_at_once_with_a_clear_error(vendor):
    served = vendor(_pages_forever(10**9))
    with client(served.url) as c, pytest.raises(MalformedResponseError) as failure:
        c.run(anext(c.client.user_pages()))
    assert "GET /users (page 1): pagination.total_pages is 1000000000, more than the 3 pages" in str(failure.value)
    assert len(served.requests) == 1  # not one page asked for ahead


def test_a_source_b_list_whose_next_page_never_ends_stops_at_max_pages(vendor):
    def script(connection: socket.socket, vendor: Vendor) -> None:
        while (request := vendor.read_request(connection)) is not None:
            if request.startswith(b"GET /api/users HTTP"):
                connection.sendall(answer(200, json.dumps([{"id": "7", "authentication_token": "tok-7777"}]).encode()))
                continue
            page = int(request.split(b"page=")[1].split(b"&")[0].split(b" ")[0])
            body = {"pagination": {"next_page": page + 1}, "data": []}  # short (empty) pages, never the end
            connection.sendall(answer(200, json.dumps(body).encode()))
    served = vendor(script)
    backup = BackupApiResource(base_url=served.url, reseller_token="r-token", admin_token="a-token", max_pages=30,
                               **FAST_HTTP)
    with Client(backup.client()) as c, pytest.raises(MalformedResponseError, match="max_pages 30"):
        c.run(c.client.tenant_pages("7", "tok-7777"))
    assert len(served.requests) == 30


def test_an_outage_is_still_retried_and_named_transient(vendor):
    served = vendor(keep_answering(answer(503, b"down for maintenance")))
    with client(served.url, max_retries=2) as c, pytest.raises(VendorUnavailableError) as failure:
        c.get_json("/users")
    assert failure.value.transient and len(served.requests) == 3 and "down for maintenance" in str(failure.value)
