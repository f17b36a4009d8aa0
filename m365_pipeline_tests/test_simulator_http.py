"""The simulator's own HTTP/1.1 layer (asyncio + httptools) on real sockets: what a full server gave for free —
keep-alive, ``Connection: close``, HTTP/1.0, pipelining in order, 400 for what the parser rejects, idle and
stop-time closing, oversized requests — must hold."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace

import pytest

from m365_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig
from m365_pipeline.simulator import server as simulator_server

SMALL = SimulatorConfig(orgs=5, users_per_org=10, seed=3)
PREFIX = "/api/saas/consolidated-view/v1"
AUTH = f"Authorization: Bearer {SMALL.saas_token}\r\n"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SMALL) as running:
        yield running


def _connect(sim: Simulator) -> socket.socket:
    return socket.create_connection(("127.0.0.1", sim.port), timeout=10)


class _Responses:
    """The responses arriving on a raw socket, read one after the other by http.client (which, left alone,
    would read ahead into a buffer of its own per response and close it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def makefile(self, *args: object, **kwargs: object) -> _Responses:
        return self

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def close(self) -> None:
        pass

    def next(self, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
        response = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        response.begin()
        return response, response.read()


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed the connection (EOF or reset), False if it is still open after 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _user_ids(sim: Simulator, count: int) -> list[str]:
    return [user["id"] for user in list(sim.dataset.saas_users())[:count]]


def _get(target: str, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    return f"GET {target} {version}\r\nHost: 127.0.0.1\r\n{AUTH}{extra}\r\n".encode()


def test_keep_alive_reuses_one_connection_for_many_requests(sim: Simulator) -> None:
    before = sim.stats()["connections"].get("accepted", 0)
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        for user_id in _user_ids(sim, 20):
            connection.request("GET", f"{PREFIX}/users/{user_id}/subscriptions",
                               headers={"Authorization": f"Bearer {SMALL.saas_token}"})
            response = connection.getresponse()
            body = json.loads(response.read())
            assert response.status == 200 and response.getheader("Connection") is None
            assert body["items"] == sim.dataset.subscriptions_of(user_id)
    finally:
        connection.close()
    assert sim.stats()["connections"]["accepted"] == before + 1


def test_connection_close_is_honoured(sim: Simulator) -> None:
    with _connect(sim) as sock:
        sock.sendall(_get(f"{PREFIX}/users", "Connection: close\r\n"))
        response, _ = _Responses(sock).next()
        assert response.status == 200 and response.getheader("Connection") == "close"
        assert _closed_by_server(sock)


@pytest.mark.parametrize(("extra", "stays_open"), [("", False), ("Connection: keep-alive\r\n", True)])
def test_http_1_0_closes_unless_asked_to_keep_alive(sim: Simulator, extra: str, stays_open: bool) -> None:
    with _connect(sim) as sock:
        responses = _Responses(sock)
        sock.sendall(_get(f"{PREFIX}/users", extra, version="HTTP/1.0"))
        response, body = responses.next()
        assert response.status == 200 and json.loads(body)["items"]
        if stays_open:
            assert response.getheader("Connection") == "keep-alive"
            sock.sendall(_get(f"{PREFIX}/users", extra, version="HTTP/1.0"))
            assert responses.next()[0].status == 200
        else:
            assert _closed_by_server(sock)


@pytest.mark.parametrize("faults", [FaultConfig(), FaultConfig(latency_ms=60, jitter_ms=50)],
                         ids=["no-latency", "jittered-latency"])
def test_pipelined_requests_are_answered_in_order(faults: FaultConfig) -> None:
    """Requests sent back to back on one connection get their own answers, in the order sent — also when
    each answer waits a different random delay."""
    with Simulator(replace(SMALL, faults=faults)) as sim:
        ids = _user_ids(sim, 8)
        with _connect(sim) as sock:
            sock.sendall(b"".join(_get(f"{PREFIX}/users/{user_id}/subscriptions") for user_id in ids)
                         + _get(f"{PREFIX}/users/not-a-user/subscriptions")
                         + f"POST {PREFIX}/users HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode()
                         + _get(f"{PREFIX}/users?page_size=3&page_number=2"))
            responses = _Responses(sock)
            for user_id in ids:
                response, body = responses.next()
                assert response.status == 200
                assert json.loads(body)["items"] == sim.dataset.subscriptions_of(user_id)
            assert responses.next()[0].status == 404
            refused, _ = responses.next()
            assert refused.status == 405 and refused.getheader("Allow") == "GET"
            page = json.loads(responses.next()[1])
            assert page["pagination"]["page_number"] == 2
            assert [u["id"] for u in page["items"]] == [u["id"] for u in list(sim.dataset.saas_users())[3:6]]
        assert sim.stats()["connections"]["accepted"] == 1


@pytest.mark.parametrize("garbage", [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
                                     b"GET /\x00 HTTP/1.1\r\n\r\n"])
def test_a_malformed_request_gets_400_and_the_connection_closed(sim: Simulator, garbage: bytes) -> None:
    with _connect(sim) as sock:
        responses = _Responses(sock)
        sock.sendall(_get(f"{PREFIX}/users") + garbage)  # a good request first: it is still answered
        assert responses.next()[0].status == 200
        response, _ = responses.next()
        assert response.status == 400 and response.getheader("Connection") == "close"
        assert _closed_by_server(sock)
    assert _get_status(sim, f"{PREFIX}/users") == 200  # and the server serves on


def test_a_client_that_half_closes_still_gets_its_delayed_answer() -> None:
    with Simulator(replace(SMALL, faults=FaultConfig(latency_ms=300))) as sim, _connect(sim) as sock:
        sock.sendall(_get(f"{PREFIX}/users"))
        sock.shutdown(socket.SHUT_WR)  # nothing more to send; the answer is still awaited
        response, body = _Responses(sock).next()
        assert response.status == 200 and json.loads(body)["items"]
        assert _closed_by_server(sock)


def test_an_upgrade_request_is_answered_and_the_connection_closed(sim: Simulator) -> None:
    with _connect(sim) as sock:
        sock.sendall(_get(f"{PREFIX}/users", "Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"\x81\x00garbage")
        response, _ = _Responses(sock).next()
        assert response.status == 200 and response.getheader("Connection") == "close"
        assert _closed_by_server(sock)


@pytest.mark.parametrize("what", ["url", "header"])
def test_very_long_urls_and_headers_are_answered_not_fatal(sim: Simulator, what: str) -> None:
    huge = "x" * 200_000
    with _connect(sim) as sock:
        if what == "url":
            sock.sendall(_get(f"{PREFIX}/users/{huge}/subscriptions"))
            response, body = _Responses(sock).next()
            assert response.status == 404 and huge in body.decode()
        else:
            sock.sendall(_get(f"{PREFIX}/users", f"X-Padding: {huge}\r\n"))
            assert _Responses(sock).next()[0].status == 200
    assert _get_status(sim, f"{PREFIX}/users") == 200


def test_head_and_other_methods_are_405_with_allow(sim: Simulator) -> None:
    with _connect(sim) as sock:
        responses = _Responses(sock)
        sock.sendall(f"HEAD {PREFIX}/users HTTP/1.1\r\nHost: x\r\n\r\n".encode() + _get(f"{PREFIX}/users"))
        head, body = responses.next(method="HEAD")
        assert head.status == 405 and head.getheader("Allow") == "GET" and body == b""
        assert responses.next()[0].status == 200  # no stray body was sent after the HEAD answer


def test_a_delayed_answer_does_not_hold_up_other_connections() -> None:
    faults = FaultConfig(slow_match="page_size=7", slow_ms=3000)
    with Simulator(replace(SMALL, faults=faults)) as sim:
        slow: list[int] = []
        waiting = threading.Thread(target=lambda: slow.append(_get_status(sim, f"{PREFIX}/users?page_size=7")))
        waiting.start()
        try:
            for _ in range(5):
                assert _get_status(sim, f"{PREFIX}/users") == 200
            assert not slow  # the delayed one is still waiting while the others were answered
        finally:
            waiting.join()
        assert slow == [200]


def test_idle_keep_alive_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulator_server, "KEEPALIVE_S", 0.5)  # 120 s in service
    with Simulator(SMALL) as sim, _connect(sim) as sock:
        sock.sendall(_get(f"{PREFIX}/users"))
        assert _Responses(sock).next()[0].status == 200
        assert _closed_by_server(sock)


def test_stop_closes_idle_keep_alive_connections_at_once() -> None:
    sim = Simulator(SMALL).start()
    try:
        sockets = [_connect(sim) for _ in range(3)]
        for sock in sockets:
            sock.sendall(_get(f"{PREFIX}/users"))
            assert _Responses(sock).next()[0].status == 200
    finally:
        started = time.monotonic()
        sim.stop()
        stopped_in = time.monotonic() - started
    assert all(_closed_by_server(sock) for sock in sockets)
    for sock in sockets:
        sock.close()
    assert stopped_in < 2


def _get_status(sim: Simulator, target: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        connection.request("GET", target, headers={"Authorization": f"Bearer {SMALL.saas_token}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# -- hostile answers (rule 19), read off the wire ---------------------------------------------------------

MIB = 1024 * 1024


def _raw_get(sock: socket.socket, responses: _Responses, target: str) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on ``sock``; the body exactly as sent (http.client never decompresses)."""
    sock.sendall(_get(target))
    return responses.next()


def test_an_oversized_answer_is_the_same_json_followed_by_n_mib_and_the_connection_serves_on() -> None:
    """Rule 19: an answer of more than N MiB (still valid JSON); the same page unmatched is the plain one."""
    with Simulator(replace(SMALL, faults=FaultConfig(oversize_match="big=1", oversize_mib=3))) as big, \
            _connect(big) as sock:
        responses = _Responses(sock)
        plain_response, plain = _raw_get(sock, responses, f"{PREFIX}/users?page_size=3")
        response, body = _raw_get(sock, responses, f"{PREFIX}/users?page_size=3&big=1")
        assert response.status == 200 and int(response.getheader("Content-Length")) == len(body)
        assert len(body) == len(plain) + 3 * MIB and body.startswith(plain) and not body[len(plain):].strip()
        assert json.loads(body) == json.loads(plain)
        assert _raw_get(sock, responses, f"{PREFIX}/users?page_size=3")[1] == plain  # kept alive, in step
        assert big.stats()["faults"]["oversize"] == 1 and plain_response.getheader("Content-Encoding") is None


def test_a_gzip_bomb_is_small_on_the_wire_and_inflates_to_n_mib_then_the_json() -> None:
    """Rule 19 (decompressed size): Content-Encoding gzip, a body about a thousandth of what it inflates to,
    a valid gzip member (zlib checks its CRC-32 and length) whose text is whitespace and then the page."""
    mib = 48
    with Simulator(replace(SMALL, faults=FaultConfig(gzip_bomb_match="bomb=1", gzip_bomb_mib=mib))) as bomb, \
            _connect(bomb) as sock:
        responses = _Responses(sock)
        plain = _raw_get(sock, responses, f"{PREFIX}/users?page_size=3")[1]
        for _ in range(2):  # the second from the cached blocks: the same bytes
            response, body = _raw_get(sock, responses, f"{PREFIX}/users?page_size=3&bomb=1")
            assert response.status == 200 and response.getheader("Content-Encoding") == "gzip"
            assert len(body) < mib * MIB // 500
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            inflated, tail, pending = 0, b"", body
            while pending and not inflate.eof:  # 1 MiB at a time: the test never holds it inflated
                chunk = inflate.decompress(pending, MIB)
                pending = inflate.unconsumed_tail
                inflated += len(chunk)
                tail = (tail + chunk)[-len(plain) - 16:]
            assert inflate.eof and not inflate.unused_data  # one whole member, trailer checked
            assert inflated == mib * MIB + len(plain) and tail.endswith(plain) and not tail[:-len(plain)].strip()
        assert bomb.stats()["faults"]["gzip_bomb"] == 2
