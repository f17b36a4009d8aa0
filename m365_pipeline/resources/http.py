"""HTTP plumbing shared by both vendor clients.

The clients are asyncio on uvloop, over keep-alive connections whose answers llhttp parses
(``transport.py``): calls in flight cost no threads, and a call costs a third of the CPU it cost on
aiohttp (bench/RESULTS.md).
The paging code stays plain, synchronous Python: ``run_concurrently`` runs each item's function in a
greenlet, and every vendor call inside it waits on the event loop (the bridge SQLAlchemy's asyncio
support is built on). Outside ``run_concurrently`` a call simply runs the loop until it is answered.

Connection errors, timeouts and 5xx are retried with exponential backoff (the transport has no retries of
its own). A 429's ``Retry-After`` pauses every call of the client, and the calls in flight follow the vendor's
pace (``pace.AdaptiveLimit``). This module also turns what comes back into errors a data engineer can act
on. Tokens travel in headers only, no message built here ever contains a header value, and redirects are
not followed, so credentials never go to another host.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, quote_plus, urlsplit

import greenlet
import msgspec
import uvloop
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from m365_pipeline.processes import young_garbage_collected_less
from m365_pipeline.resources.pace import AdaptiveLimit
from m365_pipeline.resources.transport import BadHeaderError, ConnectionPool, MalformedHttpError, header_block

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# msgspec decodes JSON in a third of the stdlib's time, and unlike orjson keeps integers of any size exact.
_decode_json = msgspec.json.Decoder().decode
THROTTLED = 429  # retried with a pause shared by all calls of the client
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # RFC 3986 path characters, and % so an encoded base URL stays as it is

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


@dataclass
class CallStats:
    """Thread-safe counters a raw asset reports as Dagster metadata."""

    calls: int = 0
    retries: int = 0
    pages: int = 0
    started: float = field(default_factory=time.monotonic)
    pace: AdaptiveLimit | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, *, retries: int, page: bool = True) -> None:
        with self._lock:
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


class _CallGreenlet(greenlet.greenlet):
    """Runs one item's plain, synchronous code; its vendor calls hand their coroutine to the loop."""


_thread = threading.local()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for vendor calls (one per thread; a client's session lives on it)."""
    loop = getattr(_thread, "loop", None)
    if loop is None or loop.is_closed():
        loop = _thread.loop = uvloop.new_event_loop()
    return loop


def _wait_for(coroutine: Coroutine[Any, Any, R]) -> R:
    """The coroutine's result, from plain code: inside ``run_concurrently`` by yielding to the loop."""
    current = greenlet.getcurrent()
    if isinstance(current, _CallGreenlet):
        return current.parent.switch(coroutine)
    return _event_loop().run_until_complete(coroutine)


async def _in_greenlet(fn: Callable[[T], R], item: T) -> R:
    """Run ``fn(item)`` in a greenlet, awaiting each coroutine it hands over (see ``_wait_for``)."""
    child = _CallGreenlet(fn, greenlet.getcurrent())
    handed = child.switch(item)
    while not child.dead:
        try:
            answer = await handed
        except BaseException as exc:  # raised inside fn, where its own code may handle it
            handed = child.throw(exc)
        else:
            handed = child.switch(answer)
    return handed


class VendorClient:
    """Base for the two source clients: one connection pool, stats, and error mapping."""

    source_name: str = "vendor"
    auth_variables: str = ""

    def __init__(self, base_url: str, headers: dict[str, str], settings: HttpSettings):
        self.base_url = base_url
        self.settings = settings
        try:
            self._pool = ConnectionPool(base_url, {"Accept": "application/json", "User-Agent": "m365-pipeline",
                                                   **headers}, settings.timeout_s, settings.pool_size)
        except BadHeaderError as exc:
            raise VendorError(f"{self.source_name}: {exc}: check {self.auth_variables}") from None
        # Percent-encoded once (as a browser would), so each call only appends its own encoded path.
        self._base_path = quote(urlsplit(base_url).path, safe=_PATH_SAFE)
        self.pace = AdaptiveLimit(settings.pool_size)
        self.stats = CallStats(pace=self.pace)
        self._retry_after_header = Retry(retry_after_max=settings.retry_after_max_s)  # parses both forms

    def close(self) -> None:
        self._pool.close()
        _wait_for(asyncio.sleep(0))  # let the loop finish closing the sockets

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_json(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        page: int | None = None,
    ) -> Any:
        """GET base_url+path and return decoded JSON, or raise a VendorError that says where."""
        return _wait_for(self._get_json(Endpoint(self.source_name, path, page), params, headers))

    async def _get_json(self, where: Endpoint, params: dict[str, Any] | None, headers: dict[str, str] | None) -> Any:
        # Callers quote path segments; _query the parameters.
        target = f"{self._base_path}{where.path}?{_query(params)}" if params else self._base_path + where.path
        try:  # a source B owner's token, from the vendor: a line break in it must not split the request
            extra = header_block(headers) if headers else b""
        except BadHeaderError as exc:
            raise MalformedResponseError(f"{where.describe()}: not sent, because {exc}") from None
        throttled = failed = 0
        while True:
            ticket = await self.pace.acquire_async()
            started = time.perf_counter()
            try:
                status, body, retry_after = await self._pool.get(target, extra)
            except (TimeoutError, OSError) as exc:  # refused, reset, DNS, TLS, not HTTP: tried again
                self.pace.release(ticket)
                if failed >= self.settings.max_retries:
                    self._raise_transport_error(where, exc, throttled)
                failed += 1
                await asyncio.sleep(self._backoff(failed))
                continue
            except BaseException:
                self.pace.release(ticket)
                raise
            if status == THROTTLED and throttled < self.settings.max_retries:
                given = self._retry_after(retry_after)
                pause = given if given is not None else min(self.settings.backoff_max_s,
                                                            self.settings.backoff_factor * 2 ** throttled)
                self.pace.release(ticket, throttled=True, retry_after_s=pause)
                throttled += 1
                continue
            ok = 200 <= status < 300
            self.pace.release(ticket, latency_s=time.perf_counter() - started if ok else None)
            if status in RETRY_STATUSES and status != THROTTLED and failed < self.settings.max_retries:
                failed += 1
                given = self._retry_after(retry_after) if status == 503 else None  # as urllib3 honours it
                await asyncio.sleep(given if given is not None else self._backoff(failed))
                continue
            return self._decode(where, status, body, failed + throttled)

    def _backoff(self, attempt: int) -> float:
        """urllib3's schedule: the first retry at once, then backoff_factor * 2 ** (attempt - 1), capped."""
        if attempt <= 1:
            return 0.0
        return min(self.settings.backoff_max_s, self.settings.backoff_factor * 2 ** (attempt - 1))

    def _retry_after(self, header: str | None) -> float | None:
        """The vendor's Retry-After in seconds (capped at retry_after_max_s); None when absent or unreadable."""
        if header is None:
            return None
        try:
            return self._retry_after_header.parse_retry_after(header)
        except InvalidHeader:
            return None

    def _raise_transport_error(self, where: Endpoint, exc: BaseException, throttled: int) -> NoReturn:
        attempts = self.settings.max_retries + 1
        self.stats.record(retries=self.settings.max_retries + throttled, page=False)
        if isinstance(exc, TimeoutError):  # connect and read timeouts alike
            raise VendorUnavailableError(
                f"{where.describe()} timed out after {attempts} attempts of {self.settings.timeout_s:g} s each"
            ) from None
        if isinstance(exc, MalformedHttpError):
            raise VendorUnavailableError(f"{where.describe()} failed after {attempts} attempts: {exc}") from None
        raise VendorUnreachableError(
            f"cannot reach {self.source_name} at {self.base_url} ({where.describe()}) after "
            f"{attempts} attempts: {_root_cause(exc)}"
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
            raise VendorNotFoundError(f"{where.describe()} answered HTTP {status}: {_safe_excerpt(body)}")
        if 300 <= status < 400:
            raise VendorError(
                f"{where.describe()} answered HTTP {status}, a redirect, which is not followed so that our "
                f"credentials never reach another host: use the address it redirects to as the base URL"
            )
        if not 200 <= status < 300:
            transient = status in RETRY_STATUSES
            hint = f" after {retries} retries" if transient else ""
            raise (VendorUnavailableError if transient else VendorError)(
                f"{where.describe()} answered HTTP {status}{hint}: {_safe_excerpt(body)}"
            )
        try:
            return _decode_json(body)
        except ValueError:  # msgspec.DecodeError: not JSON, not UTF-8, or NaN/Infinity (not JSON either)
            raise MalformedResponseError(
                f"{where.describe()} answered {status} with a body that is not valid JSON ({len(body)} bytes)"
            ) from None


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
    while (nested := getattr(inner, "os_error", None) or inner.__cause__) is not None:
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


def _safe_excerpt(body: bytes, limit: int = 200) -> str:
    """A short, single-line slice of an error body so the vendor's own message is visible."""
    text = body[: limit * 4].decode("utf-8", "replace")[:limit].replace("\n", " ").strip()
    return text or "(empty body)"


# Items started ahead of the oldest unfinished one, per call allowed in flight: a slow answer at the head
# of the line must not leave the rest idle (results are handed back in order), and a started item
# costs only a small task, not a thread.
AHEAD = 4


def run_concurrently(
    items: Iterable[T],
    fn: Callable[[T], R],
    *,
    workers: int,
    on_result: Callable[[T, R], None],
    pace: AdaptiveLimit | None = None,
) -> int:
    """Apply ``fn`` to every item concurrently on the event loop, handing results back in order.

    ``fn`` is plain code; each vendor call it makes waits on the loop, so many items are in flight
    at once without a thread each. Results reach ``on_result`` in input order, so the caller
    can stream them to disk without holding them all. At most ``AHEAD * workers`` items are
    started ahead, or ``AHEAD`` times the client's current limit when ``pace`` is given (the limit
    then decides how many calls are in flight). The first failure cancels everything else and is re-raised.
    """
    with young_garbage_collected_less():
        return _event_loop().run_until_complete(_run_concurrently(items, fn, workers, on_result, pace))


async def _run_concurrently(items: Iterable[T], fn: Callable[[T], R], workers: int,
                            on_result: Callable[[T, R], None], pace: AdaptiveLimit | None) -> int:
    done = 0
    iterator: Iterator[T] = iter(items)
    pending: deque[tuple[T, asyncio.Task[R]]] = deque()

    def window() -> int:
        return max(1, AHEAD * min(workers, pace.limit if pace else workers))

    try:
        for item in iterator:
            pending.append((item, asyncio.ensure_future(_in_greenlet(fn, item))))
            while len(pending) >= window():
                head, task = pending.popleft()
                on_result(head, await task)
                done += 1
        while pending:
            head, task = pending.popleft()
            on_result(head, await task)
            done += 1
    except BaseException:
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        raise
    return done


def fetched_ahead(items: Iterable[T], fn: Callable[[T], R], *, ahead: int) -> Iterator[R]:
    """``fn(item)`` for every item, yielded in order, with up to ``ahead`` items fetched concurrently ahead.

    The iterator form of ``run_concurrently``, for plain code that consumes results one by one (a paged
    list written to disk as it comes): while the caller handles one result, the next ones are on their
    way. Closing the iterator early (or an error) cancels what was started. Must not be used from inside
    ``run_concurrently``'s items (``can_fetch_ahead`` says whether it can).
    """
    loop = _event_loop()
    iterator: Iterator[T] = iter(items)
    pending: deque[asyncio.Task[R]] = deque()
    try:
        while True:
            for item in iterator:
                pending.append(loop.create_task(_in_greenlet(fn, item)))
                if len(pending) > ahead:
                    break
            if not pending:
                return
            result = loop.run_until_complete(pending[0])  # still in ``pending`` if interrupted: cancelled below
            pending.popleft()
            yield result
    finally:
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def can_fetch_ahead() -> bool:
    """True outside ``run_concurrently``'s items (there the loop is already running)."""
    return not isinstance(greenlet.getcurrent(), _CallGreenlet) and not _event_loop().is_running()
