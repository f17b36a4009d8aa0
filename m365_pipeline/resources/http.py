"""HTTP plumbing shared by both vendor clients, on aiohttp and uvloop.

Each source's client holds one ``aiohttp.ClientSession`` for the run: keep-alive connections, as many as
the resource's ``concurrency`` ceiling, answers parsed by llhttp. The vendor drivers (saas.py, backup.py)
are ``async def``; the pagers that decide their next request (paging.py) do no I/O. A raw asset enters one
event loop once (``run_pull``), and ``run_concurrently`` / ``in_order`` keep many items in flight on it,
handing results back in input order.

Connection errors, timeouts and 5xx are retried with full-jitter exponential backoff. A 429's
``Retry-After`` pauses every call of the client once per window, and the calls in flight follow the
vendor's pace (``pace.AdaptiveLimit``). This module also turns what comes back into errors a data engineer
can act on: tokens travel in headers only, no message built here carries a header value, every text a vendor
sent passes through ``scrub`` first (rule 19), an answer is refused past ``max_response_mib`` (before or
after decompression), and redirects are never followed, so credentials never go to another host.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, quote_plus, urlsplit

import aiohttp
import msgspec
import uvloop
from aiohttp.helpers import get_env_proxy_for_url
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry
from yarl import URL

from m365_pipeline.processes import young_garbage_collected_less
from m365_pipeline.resources.pace import AdaptiveLimit
from m365_pipeline.scrub import remember_secret, scrub
from m365_pipeline.settings import CA_BUNDLE_VARIABLE, env_value

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# msgspec decodes JSON in a third of the stdlib's time, and unlike orjson keeps integers of any size exact.
_decode_json = msgspec.json.Decoder().decode
THROTTLED = 429  # retried with a pause shared by all calls of the client
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # RFC 3986 path characters, and % so an encoded base URL stays as it is
MIB = 1024 * 1024
_CHUNK = 256 * 1024  # an answer is read in pieces this size, so its size is known before it is all in memory

T = TypeVar("T")
R = TypeVar("R")


class VendorError(RuntimeError):
    """A vendor call failed in a way retries could not fix. The message is safe to log.

    ``transient`` says whether trying the whole step again later may help (an outage) or not
    (bad credentials, bad configuration, malformed data).
    """

    transient = False


class VendorAuthError(VendorError):
    """The vendor rejected our credentials (401/403)."""


class VendorUnavailableError(VendorError):
    """Timeouts, 429 and 5xx that outlasted our retries: the vendor may be back later."""

    transient = True


class VendorUnreachableError(VendorUnavailableError):
    """The vendor host could not be reached at all."""


class VendorNotFoundError(VendorError):
    """404: the record was deleted at the vendor after it was listed (callers decide if that is fine)."""


class MalformedResponseError(VendorError):
    """The vendor answered 2xx with something that is not what its documentation promises."""


class ResponseTooLargeError(VendorError):
    """An answer past ``max_response_mib`` (rule 19): not retried, since it would be as large again."""


@dataclass
class CallStats:
    """Counters a raw asset reports as Dagster metadata (its calls all run on one event loop)."""

    calls: int = 0
    retries: int = 0
    pages: int = 0
    started: float = field(default_factory=time.monotonic)
    pace: AdaptiveLimit | None = field(default=None, repr=False)

    def record(self, *, retries: int, page: bool = True) -> None:
        self.calls += 1 + retries
        self.retries += retries
        self.pages += int(page)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def as_metadata(self) -> dict[str, float | int]:
        elapsed = self.elapsed_s
        pace = self.pace.snapshot() if self.pace else None
        return {
            "vendor_calls": self.calls,
            "vendor_retries": self.retries,
            "pages": self.pages,
            "elapsed_s": round(elapsed, 3),
            "calls_per_s": round(self.calls / elapsed, 1) if elapsed > 0 else 0.0,
            **({"vendor_429s": pace.throttled, "concurrency_peak": pace.peak, "concurrency_final": pace.limit}
               if pace else {}),
        }

    def progress(self) -> str:
        """One line for the run log: calls/s, calls in flight and 429s so far."""
        line = (f"{self.calls:,} calls, {self.retries:,} retries, "
                f"{self.calls / max(self.elapsed_s, 1e-9):.0f} calls/s")
        if self.pace:
            pace = self.pace.snapshot()
            line += f", concurrency {pace.limit} (peak {pace.peak}), {pace.throttled:,} answered 429"
        return line


@dataclass(frozen=True)
class HttpSettings:
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_factor: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: int = 120
    pool_size: int = 256  # the ceiling on calls in flight; the client finds its pace below it
    max_response_bytes: int = 64 * 1024 * 1024  # rule 19: before or after decompression
    max_pages: int = 100_000  # a list that claims more pages, or whose next_page never ends, is refused


def validate_base_url(url: str, variable: str) -> str:
    """Return the URL without a trailing slash, or fail naming the variable to fix."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise VendorError(
            f"{variable} must be an http(s) URL such as https://host/api, got {url.strip()!r}"
        )
    if parts.username or parts.password:
        raise VendorError(f"{variable} must not embed credentials; use the token variables instead")
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class Endpoint:
    """Where a call went, for error messages: never includes headers or tokens."""

    source: str
    path: str
    page: int | None = None

    def describe(self) -> str:
        where = f"{self.source} GET {self.path}"
        return f"{where} (page {self.page})" if self.page is not None else where


# One page of records and where it came from (for error messages and staging).
Page = tuple[Endpoint, list[dict[str, Any]]]


def vendor_value(value: Any, limit: int = 200) -> str:
    """A text the vendor sent, fit for a message (rule 19): one line, at most ``limit`` characters, scrubbed."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else repr(value)
    text = " ".join(scrub(text[: limit * 4]).split())  # scrubbed before it is cut: no token half-kept
    return (text[:limit] or "(empty body)") if isinstance(value, bytes | bytearray) else text[:limit]


def tls_context() -> ssl.SSLContext:
    """Certificates and host names checked against ``M365_CA_BUNDLE`` when set, else the system's CA store
    (which ``SSL_CERT_FILE`` replaces, as OpenSSL has it); a named file that is missing is said at once."""
    bundle = env_value(CA_BUNDLE_VARIABLE)
    for variable, path in ((CA_BUNDLE_VARIABLE, bundle), ("SSL_CERT_FILE", env_value("SSL_CERT_FILE"))):
        if path is not None and not Path(path).is_file():
            raise VendorError(f"{variable}={path} is not a file: name the CA bundle (PEM) that signs the vendors' "
                              "certificates (or unset it to use the system's store)")
    try:
        return ssl.create_default_context(cafile=bundle)
    except ssl.SSLError as exc:  # the file holds no certificate OpenSSL can read
        raise VendorError(f"{CA_BUNDLE_VARIABLE}={bundle} is not a PEM CA bundle ({exc.reason})") from None


@dataclass(frozen=True)
class Proxy:
    """The forward proxy the environment names for a vendor URL (``HTTPS_PROXY``/``HTTP_PROXY``, ``NO_PROXY``)."""

    url: URL
    auth: aiohttp.BasicAuth | None
    variable: str

    def describe(self) -> str:
        """The proxy without its credentials: host and port only."""
        return f"the proxy {self.variable} names ({self.url.host}:{self.url.port})"


def env_proxy(base_url: str) -> Proxy | None:
    """The proxy for ``base_url`` as aiohttp reads the environment (NO_PROXY honoured), read once per client."""
    scheme = urlsplit(base_url).scheme
    names = [name for name in (f"{scheme.upper()}_PROXY", f"{scheme}_proxy") if env_value(name)]
    if not names:
        return None
    variable = names[0]
    value = env_value(variable) or ""
    parts = urlsplit(value.strip())
    if parts.scheme != "http" or not parts.hostname:
        raise VendorError(f"{variable} must be an http:// proxy URL such as http://proxy:3128 (https:// proxies "
                          "are not supported; an https vendor goes through the proxy's CONNECT tunnel)")
    try:
        url, auth = get_env_proxy_for_url(URL(base_url))
    except LookupError:  # NO_PROXY names the vendor's host
        return None
    if auth is not None:
        remember_secret(auth.password, f"{variable} password")
    return Proxy(url, auth, variable)


def check_header_values(headers: dict[str, str]) -> str | None:
    """Why a header cannot be sent (a line break would split the request), naming it and never its value."""
    for name, value in headers.items():
        if any(char in value for char in "\r\n\0"):
            return f"the {name} header carries a line break or NUL character"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"the {name} header carries a character HTTP headers cannot carry"
    return None


class VendorClient:
    """Base for the two source clients: one aiohttp session, stats, and error mapping.

    Used as ``async with resource.client() as client:`` on the pull's event loop (``run_pull``).
    """

    source_name: str = "vendor"
    auth_variables: str = ""

    def __init__(self, base_url: str, headers: dict[str, str], settings: HttpSettings):
        self.base_url = base_url
        self.settings = settings
        problem = check_header_values(headers)
        if problem is not None:
            raise VendorError(f"{self.source_name}: {problem}: check {self.auth_variables}")
        for value in headers.values():
            remember_secret(value.removeprefix("Bearer "), "configured token")
        self._headers = {"Accept": "application/json", "User-Agent": "m365-pipeline", **headers}
        parts = urlsplit(base_url)
        # Percent-encoded once (as a browser would), so each call only appends its own encoded path.
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base_path = quote(parts.path, safe=_PATH_SAFE)
        self._tls = tls_context() if parts.scheme == "https" else None
        self._proxy = env_proxy(base_url)
        self.pace = AdaptiveLimit(settings.pool_size)
        self.stats = CallStats(pace=self.pace)
        self._retry_after_header = Retry(retry_after_max=settings.retry_after_max_s)  # parses both forms
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self):
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout_s,
                                        sock_read=self.settings.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.settings.pool_size, ssl=self._tls or False, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=timeout, auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),  # a vendor's cookie never rides along on another call
            proxy=self._proxy.url if self._proxy else None, proxy_auth=self._proxy.auth if self._proxy else None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get_json(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        page: int | None = None,
    ) -> Any:
        """GET base_url+path and return decoded JSON, or raise a VendorError that says where."""
        where = Endpoint(self.source_name, path, page)
        if self._session is None:
            raise RuntimeError("use the client as `async with resource.client() as client:`")
        # Callers quote path segments; _query the parameters.
        target = f"{self._base_path}{path}?{_query(params)}" if params else self._base_path + path
        url = URL(self._origin + target, encoded=True)
        if headers:  # a source B owner's token, from the vendor: a line break in it must not split the request
            problem = check_header_values(headers)
            if problem is not None:
                raise MalformedResponseError(f"{where.describe()}: not sent, because {problem}")
        throttled = failed = 0
        while True:
            ticket = await self.pace.acquire()
            started = time.perf_counter()
            try:
                status, body, retry_after = await self._exchange(url, headers, where)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.pace.release(ticket, dropped=True)
                if not _worth_retrying(exc) or failed >= self.settings.max_retries:
                    self._raise_transport_error(where, exc, failed, throttled)
                failed += 1
                await asyncio.sleep(self._backoff(failed))
                continue
            except BaseException:
                self.pace.release(ticket)
                raise
            if status == THROTTLED and throttled < self.settings.max_retries:
                given = self._retry_after(retry_after)
                pause = given if given is not None else self._backoff(throttled + 1)
                self.pace.release(ticket, throttled=True, retry_after_s=pause,
                                  latency_s=time.perf_counter() - started)
                throttled += 1
                continue
            ok = 200 <= status < 300
            if status in RETRY_STATUSES and status != THROTTLED and failed < self.settings.max_retries:
                self.pace.release(ticket, dropped=True)
                failed += 1
                given = self._retry_after(retry_after) if status == 503 else None  # as urllib3 honours it
                await asyncio.sleep(given if given is not None else self._backoff(failed))
                continue
            self.pace.release(ticket, latency_s=time.perf_counter() - started if ok else None)
            return self._decode(where, status, body, failed + throttled)

    async def _exchange(self, url: URL, headers: dict[str, str] | None,
                        where: Endpoint) -> tuple[int, bytes, str | None]:
        """One GET: status, body (at most ``max_response_bytes``, decompressed) and Retry-After."""
        assert self._session is not None
        cap = self.settings.max_response_bytes
        async with self._session.get(url, headers=headers, allow_redirects=False) as response:
            length = response.content_length  # as sent, before decompression
            if length is not None and length > cap:
                response.close()
                self._too_large(where, f"says it is {length:,} bytes")
            if length is not None and "Content-Encoding" not in response.headers:
                body = await response.read()  # exactly Content-Length bytes
            else:  # read in pieces, counting what decompression makes of them (aiohttp inflates in bounded steps)
                chunks, size = [], 0
                while chunk := await response.content.read(_CHUNK):
                    size += len(chunk)
                    if size > cap:
                        response.close()
                        self._too_large(where, "inflates past it" if "Content-Encoding" in response.headers
                                        else "grew past it")
                    chunks.append(chunk)
                body = b"".join(chunks)
            return response.status, body, response.headers.get("Retry-After")

    def _too_large(self, where: Endpoint, how: str) -> NoReturn:
        self.stats.record(retries=0, page=False)
        raise ResponseTooLargeError(
            f"{where.describe()}: the answer is larger than {self.settings.max_response_bytes // MIB} MiB "
            f"(max_response_mib) and {how}; not read further"
        )

    def _backoff(self, attempt: int) -> float:
        """Full jitter (AWS's "exponential backoff and jitter"): a random wait up to factor * 2 ** attempt,
        capped, so calls that failed together do not all come back together."""
        return random.uniform(0, min(self.settings.backoff_max_s, self.settings.backoff_factor * 2 ** attempt))

    def _retry_after(self, header: str | None) -> float | None:
        """The vendor's Retry-After in seconds (capped at retry_after_max_s); None when absent or unreadable."""
        if header is None:
            return None
        try:
            return self._retry_after_header.parse_retry_after(header)
        except InvalidHeader:
            return None

    def _raise_transport_error(self, where: Endpoint, exc: BaseException, failed: int, throttled: int) -> NoReturn:
        attempts = failed + 1
        self.stats.record(retries=failed + throttled, page=False)
        tried = f"after {attempts} attempts" if attempts > 1 else "at the first attempt"
        if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy answered CONNECT with an error
            assert self._proxy is not None
            raise VendorUnreachableError(
                f"{self._proxy.describe()} refused to carry {where.describe()} (HTTP {exc.status}; its credentials?): "
                f"check {self._proxy.variable} (and NO_PROXY)") from None
        if isinstance(exc, aiohttp.ClientProxyConnectionError) and self._proxy is not None:
            raise VendorUnreachableError(
                f"cannot reach {self._proxy.describe()} for {where.describe()} {tried}: {_root_cause(exc)}: "
                f"check {self._proxy.variable} (and NO_PROXY)") from None
        if isinstance(exc, TimeoutError):  # connect and read timeouts alike
            raise VendorUnavailableError(
                f"{where.describe()} timed out {tried} of {self.settings.timeout_s:g} s each"
            ) from None
        if isinstance(exc, aiohttp.ClientPayloadError):
            what = ("the answer's Content-Encoding could not be decoded" if "encoding" in str(exc).lower()
                    else "the vendor closed the connection before the answer was complete")
            raise VendorUnavailableError(f"{where.describe()} failed {tried}: {what}") from None
        if isinstance(exc, aiohttp.ClientResponseError):  # llhttp: the bytes are not an HTTP answer
            raise VendorUnavailableError(f"{where.describe()} failed {tried}: the answer is not valid HTTP") from None
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            raise VendorUnavailableError(
                f"{where.describe()} failed {tried}: the vendor closed the connection without an answer") from None
        raise VendorUnreachableError(
            f"cannot reach {self.source_name} at {self.base_url} ({where.describe()}) {tried}: {_root_cause(exc)}"
        ) from None

    def _decode(self, where: Endpoint, status: int, body: bytes, retries: int) -> Any:
        """Map the final answer to decoded JSON or a VendorError that says where."""
        self.stats.record(retries=retries)
        if status in (401, 403):
            raise VendorAuthError(
                f"{self.source_name} rejected our credentials ({status}) on {where.describe()}: "
                f"check {self.auth_variables}"
            )
        if status == 404:
            raise VendorNotFoundError(f"{where.describe()} answered HTTP {status}: {vendor_value(body)}")
        if 300 <= status < 400:
            raise VendorError(
                f"{where.describe()} answered HTTP {status}, a redirect, which is not followed so that our "
                f"credentials never reach another host: use the address it redirects to as the base URL"
            )
        if not 200 <= status < 300:
            transient = status in RETRY_STATUSES
            hint = f" after {retries} retries" if transient else ""
            raise (VendorUnavailableError if transient else VendorError)(
                f"{where.describe()} answered HTTP {status}{hint}: {vendor_value(body)}"
            )
        try:
            return _decode_json(body)
        except ValueError:  # msgspec.DecodeError: not JSON, not UTF-8, or NaN/Infinity (not JSON either)
            raise MalformedResponseError(
                f"{where.describe()} answered {status} with a body that is not valid JSON ({len(body)} bytes)"
            ) from None


def _worth_retrying(exc: BaseException) -> bool:
    """A certificate the vendor's host fails, or a proxy's refusal, is the same the next time."""
    return not isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientHttpProxyError)


_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+").fullmatch  # RFC 3986: never percent-encoded


def path_segment(value: Any) -> str:
    """A vendor value as one URL path segment: percent-encoded, so a ``/`` or ``?`` in it cannot change the path."""
    text = str(value)
    return text if _UNRESERVED(text) else quote(text, safe="")


def _query(params: dict[str, Any]) -> str:
    """``urlencode`` for our parameters, faster: names are the code's own, whole numbers need no quoting."""
    return "&".join(f"{name}={value}" if type(value) is int else f"{name}={quote_plus(str(value))}"
                    for name, value in params.items())


def _root_cause(exc: BaseException) -> str:
    """The innermost reason ("Connection refused"), without URLs or headers."""
    inner: BaseException = exc
    while (nested := getattr(inner, "certificate_error", None) or getattr(inner, "os_error", None)
           or inner.__cause__) is not None:
        inner = nested
    # The system's own words, never a URL: asyncio words a refusal "Connect call failed (address)".
    if isinstance(inner, ssl.SSLCertVerificationError):  # its errno is OpenSSL's, not the system's
        return f"TLS certificate verify failed: {inner.verify_message}"
    if isinstance(inner, ssl.SSLError):
        return f"TLS: {inner.reason or type(inner).__name__}"
    if isinstance(inner, socket.gaierror) and inner.strerror:
        return inner.strerror
    if isinstance(inner, OSError) and inner.errno:
        return os.strerror(inner.errno)
    text = str(inner)
    for marker in ("Connection refused", "Connection reset", "Server disconnected"):
        if marker in text:
            return marker
    return type(inner).__name__


def run_pull(main: Coroutine[Any, Any, R]) -> R:
    """Run one pull to its end on a fresh uvloop event loop: how a raw asset enters async code, once."""
    with young_garbage_collected_less(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# Items started ahead of the oldest unfinished one, per call allowed in flight: a slow answer at the head
# of the line must not leave the rest idle (results are handed back in order), and a started item
# costs only a small task.
AHEAD = 4


async def in_order(items: Iterable[T], fn: Callable[[T], Awaitable[R]],
                   window: Callable[[], int]) -> AsyncIterator[tuple[T, R]]:
    """``(item, await fn(item))`` for every item, in input order, with up to ``window()`` items started ahead.

    Closing the iterator early (or an error) cancels what was started, and the first failure is raised.
    """
    pending: deque[tuple[T, asyncio.Future[R]]] = deque()
    iterator = iter(items)
    try:
        while True:
            for item in iterator:
                pending.append((item, asyncio.ensure_future(fn(item))))
                if len(pending) > window():
                    break
            if not pending:
                return
            item, task = pending[0]
            result = await task  # still in ``pending`` if interrupted: cancelled below
            pending.popleft()
            yield item, result
    finally:
        for _, task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)


async def fetched_ahead(items: Iterable[T], fn: Callable[[T], Awaitable[R]], *, ahead: int) -> AsyncIterator[R]:
    """``await fn(item)`` for every item, in order, with up to ``ahead`` items fetched concurrently ahead."""
    async with aclosing(in_order(items, fn, lambda: ahead)) as results:
        async for _, result in results:
            yield result


async def run_concurrently(
    items: Iterable[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    workers: int,
    on_result: Callable[[T, R], None],
    pace: AdaptiveLimit | None = None,
) -> int:
    """Apply ``fn`` to every item concurrently, handing results to ``on_result`` in input order.

    So the caller can stream them to disk without holding them all. At most ``AHEAD * workers`` items are
    started ahead, or ``AHEAD`` times the client's current limit when ``pace`` is given (the limit then
    decides how many calls are in flight). The first failure cancels everything else and is re-raised.
    """
    done = 0
    window = (lambda: max(1, AHEAD * min(workers, pace.limit))) if pace else (lambda: max(1, AHEAD * workers))
    async with aclosing(in_order(items, fn, window)) as results:
        async for item, result in results:
            on_result(item, result)
            done += 1
    return done
