"""Keep-alive HTTP/1.1 connections for the vendor clients: asyncio transports, answers parsed by llhttp.

The clients make one kind of request, a GET with a few fixed headers, hundreds of thousands of times a
night. aiohttp's general request path (sessions, cookie jars, multidicts, URL objects, tracing) was about
two thirds of the client's CPU per call; this module does only what a vendor call needs, at a third of
the cost (bench/RESULTS.md, "Pull at the vendor's pace"):

* connections kept alive and reused, one request at a time each, over TCP or TLS (the system's CA store,
  certificate and host name checked), opened by Happy Eyeballs (aiohappyeyeballs) across a host's
  addresses; a kept-alive connection the vendor closed just as it was reused is sent again on a new one;
* a connect timeout and a read timeout (the longest wait for the next bytes of an answer);
* answers parsed by httptools, the bindings to llhttp (the C parser of Node.js, and of aiohttp): status,
  headers, Content-Length, chunked and read-until-close bodies; gzip-encoded bodies decompressed.

Header values are checked once, when a client is made or a vendor value becomes a header: a line break
in one would split the request. No error raised here carries a header value.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools

DEFAULT_PORTS = {"http": 80, "https": 443}
HAPPY_EYEBALLS_DELAY_S = 0.25  # RFC 8305's recommended wait before trying the next address


class Answer(NamedTuple):
    status: int
    body: bytes
    retry_after: str | None  # the Retry-After header, as sent


class BadHeaderError(ValueError):
    """A header value a request cannot carry (a line break, NUL, or a character outside Latin-1)."""


class ServerDisconnectedError(ConnectionResetError):
    """The vendor closed the connection before its answer was complete."""

    def __init__(self) -> None:
        super().__init__("Server disconnected")


class MalformedHttpError(ConnectionError):
    """The vendor's bytes are not an HTTP answer (retried like a broken connection, then reported)."""


def header_block(headers: Mapping[str, str]) -> bytes:
    """``Name: value`` lines for a request, or ``BadHeaderError`` naming the header (never its value)."""
    lines = []
    for name, value in headers.items():
        if any(char in value for char in "\r\n\0"):
            raise BadHeaderError(f"the {name} header carries a line break or NUL character")
        try:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        except UnicodeEncodeError:
            raise BadHeaderError(f"the {name} header carries a character HTTP headers cannot carry") from None
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and waits for its whole answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._body: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 0.0
        self.reusable = False
        self.answered = False  # some bytes of the current request's answer arrived

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes no request asked for: the connection can no longer be trusted
            self.close()
            return
        self._last_data = self._loop.time()
        self.answered = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # 101 is no answer to a GET
            self._fail(MalformedHttpError(f"the answer is not valid HTTP ({type(exc).__name__})"))

    def eof_received(self) -> None:
        self.reusable = False  # the vendor is done with this connection; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._answer is not None and not self._answer.done():
            if exc is None and self._headers_done and not self._framed():
                self._complete()  # a body that ends when the connection does (no length, not chunked)
            else:
                self._fail(ServerDisconnectedError())

    # -- httptools callbacks -------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:  # an interim answer (103 Early Hints): the real one follows
            self._body, self._headers, self._headers_done = [], [], False
            return
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._complete()

    # -- requests ------------------------------------------------------------------------------------
    def exchange(self, request: bytes, timeout_s: float) -> asyncio.Future[Answer]:
        assert self._transport is not None and self._answer is None
        self._answer = answer = self._loop.create_future()
        self._body, self._headers, self._headers_done, self.answered = [], [], False, False
        self._timeout_s, self._last_data = timeout_s, self._loop.time()
        if self._timer is None:  # else the running one checks this request too, re-arming for its deadline
            self._timer = self._loop.call_at(self._last_data + timeout_s, self._check_timeout)
        self._transport.write(request)
        return answer

    def close(self) -> None:
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def _check_timeout(self) -> None:
        # One timer per connection, not one per request: it outlives the answers it was armed for and
        # re-arms for the current request's deadline, which bytes arriving push back (a slow but steady
        # answer is not cut off). An idle connection lets it lapse.
        self._timer = None
        if self._answer is None:
            return
        deadline = self._last_data + self._timeout_s
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
        else:
            self._fail(TimeoutError())

    def _framed(self) -> bool:
        return any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers)

    def _header(self, wanted: bytes) -> bytes | None:
        for name, value in self._headers:
            if len(name) == len(wanted) and name.lower() == wanted:
                return value
        return None

    def _complete(self) -> None:
        answer, self._answer = self._answer, None
        if answer is None or answer.done():
            self.reusable = False  # an answer nobody waits for: the connection is out of step
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        encoding = self._header(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            try:
                if encoding.strip().lower() != b"gzip":
                    raise zlib.error
                body = zlib.decompress(body, wbits=zlib.MAX_WBITS | 16)
            except zlib.error:
                self.reusable = False
                answer.set_exception(MalformedHttpError("the answer's Content-Encoding could not be decoded"))
                return
        retry_after = self._header(b"retry-after")
        answer.set_result(Answer(self._parser.get_status_code(), body,
                                 None if retry_after is None else retry_after.decode("latin-1")))

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        self.close()
        if answer is not None and not answer.done():
            answer.set_exception(exc)


class ConnectionPool:
    """Keep-alive connections to one vendor host, and GET requests over them.

    ``size`` bounds the idle connections kept; the client's ``AdaptiveLimit`` bounds those in use.
    Not thread-safe: a pool lives on one event loop, as its client does.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout_s: float, size: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._head = header_block({"Host": parts.netloc, "Accept-Encoding": "gzip", **headers}) + b"\r\n"
        self._timeout_s = timeout_s
        self._size = size
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def get(self, target: str, headers: bytes = b"") -> Answer:
        """GET ``target`` (path and query, percent-encoded); ``headers`` from ``header_block``, sent as well.

        Raises ``TimeoutError``, ``OSError`` (refused, reset, TLS, DNS), ``ServerDisconnectedError`` or
        ``MalformedHttpError``; the connection is then dropped, never reused.
        """
        request = b"GET " + target.encode("ascii") + b" HTTP/1.1\r\n" + headers + self._head
        connection = self._idle_connection()
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except ServerDisconnectedError:
                if connection.answered:
                    raise
                # A kept-alive connection the vendor closed just as it was reused: sent again on a new one
                # (a GET is idempotent), as HTTP clients do; not a vendor failure, so no retry is spent on it.
        return await self._exchange(await self._connect(), request)

    def close(self) -> None:
        """Close every connection (the loop finishes closing them the next time it runs); no new ones open."""
        self._closed = True
        for connection in list(self._open):
            self._drop(connection)
        self._idle.clear()

    async def _exchange(self, connection: _Connection, request: bytes) -> Answer:
        try:
            answer = await connection.exchange(request, self._timeout_s)
        except BaseException:
            self._drop(connection)
            raise
        if connection.reusable and len(self._idle) < self._size:
            self._idle.append(connection)
        else:
            self._drop(connection)
        return answer

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable:  # the vendor may have closed it while it was idle
                return connection
            self._drop(connection)
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionAbortedError("the client is closed")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s):
            addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            # Happy Eyeballs (RFC 8305): an address family whose route drops packets (IPv6, often) must not
            # hold every connection for the whole timeout before the next address is tried.
            sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S,
                                                           loop=loop)
            try:
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), sock=sock, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
            except BaseException:
                sock.close()
                raise
        self._open.add(connection)
        return connection

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)
