"""HTTP plumbing shared by both vendor clients.

Retries and backoff on connection errors and 5xx are urllib3's ``Retry`` on a pooled urllib3
``PoolManager``. A 429 is retried here instead: its ``Retry-After`` pauses every worker of the
client, and the calls in flight follow the vendor's pace (``pace.AdaptiveLimit``). This module
also turns what comes back into errors a data engineer can act on. Tokens travel in headers
only, and no message built here ever contains a header value.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import make_headers
from urllib3.util.retry import Retry

from m365_pipeline.resources.pace import AdaptiveLimit

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
THROTTLED = 429  # retried by VendorClient itself, with a pause shared by all its workers
TOKEN_HEADERS = ("Authorization", "X-Access-Token", "X-Reseller-Token")

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


class _Retry(Retry):
    # urllib3 would retry any 429 carrying Retry-After on its own, pausing only that call.
    RETRY_AFTER_STATUS_CODES = frozenset({503})


def retry_policy(settings: HttpSettings) -> Retry:
    """Connection errors and 5xx, with exponential backoff; 429 is left to VendorClient."""
    return _Retry(
        total=settings.max_retries,
        connect=settings.max_retries,
        read=settings.max_retries,
        status=settings.max_retries,
        other=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES - {THROTTLED},
        backoff_factor=settings.backoff_factor,
        backoff_max=settings.backoff_max_s,
        respect_retry_after_header=True,
        retry_after_max=settings.retry_after_max_s,
        raise_on_status=False,
        raise_on_redirect=True,
        # A redirect to another host never carries our credentials along.
        remove_headers_on_redirect=Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT | set(TOKEN_HEADERS),
    )


def build_pool(settings: HttpSettings, base_headers: dict[str, str]) -> urllib3.PoolManager:
    """A connection pool that retries connection errors and 5xx with backoff."""
    # urllib3 without requests on top: requests' per-call overhead halved the calls/s of the
    # per-user pull (bench/RESULTS.md: 1.15k -> 2.3k calls/s against the simulator, 0.82 -> 0.41 ms CPU/call).
    # urllib3 never reads proxy variables, so a stray one cannot reroute vendor traffic.
    return urllib3.PoolManager(
        num_pools=2,
        maxsize=settings.pool_size,
        block=True,
        retries=retry_policy(settings),
        timeout=urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
        headers={**make_headers(accept_encoding=True), "Accept": "application/json",
                 "User-Agent": "m365-pipeline", **base_headers},
    )


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


class VendorClient:
    """Base for the two source clients: one connection pool, stats, and error mapping."""

    source_name: str = "vendor"
    auth_variables: str = ""

    def __init__(self, base_url: str, headers: dict[str, str], settings: HttpSettings):
        self.base_url = base_url
        self.settings = settings
        self.pool = build_pool(settings, headers)
        self.pace = AdaptiveLimit(settings.pool_size)
        self.stats = CallStats(pace=self.pace)
        self._retry = retry_policy(settings)

    def close(self) -> None:
        self.pool.clear()

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
        where = Endpoint(self.source_name, path, page)
        url = self.base_url + path
        throttled = 0
        while True:
            ticket = self.pace.acquire()
            started = time.perf_counter()
            try:
                response = self.pool.request(
                    "GET", url, fields=params,
                    headers={**self.pool.headers, **headers} if headers else None,  # merged, not replaced
                )
            except BaseException as exc:
                self.pace.release(ticket)
                self._raise_transport_error(where, exc, throttled)
            latency = time.perf_counter() - started
            if response.status == THROTTLED and throttled < self.settings.max_retries:
                self.pace.release(ticket, throttled=True, retry_after_s=self._retry_after(response, throttled))
                throttled += 1
                continue
            self.pace.release(ticket, latency_s=latency if 200 <= response.status < 300 else None)
            return self._decode(where, response, throttled)

    def _retry_after(self, response: urllib3.BaseHTTPResponse, attempt: int) -> float:
        """The vendor's Retry-After (capped at retry_after_max_s), else exponential backoff."""
        given = self._retry.get_retry_after(response)
        if given is not None:
            return given
        return min(self.settings.backoff_max_s, self.settings.backoff_factor * 2 ** attempt)

    def _raise_transport_error(self, where: Endpoint, exc: BaseException, throttled: int) -> NoReturn:
        if isinstance(exc, MaxRetryError):
            self.stats.record(retries=self.settings.max_retries + throttled, page=False)
            # urllib3 files a refused connection (NewConnectionError) under timeouts too.
            if isinstance(exc.reason, Urllib3Timeout) and not isinstance(exc.reason, NewConnectionError):
                raise VendorUnavailableError(
                    f"{where.describe()} timed out after {self.settings.max_retries + 1} attempts "
                    f"of {self.settings.timeout_s:g} s each"
                ) from None
            raise VendorUnreachableError(
                f"cannot reach {self.source_name} at {self.base_url} ({where.describe()}) after "
                f"{self.settings.max_retries + 1} attempts: {_root_cause(exc)}"
            ) from None
        if isinstance(exc, HTTPError):
            self.stats.record(retries=throttled, page=False)
            raise VendorError(f"{where.describe()} failed: {type(exc).__name__}") from None
        raise exc

    def _decode(self, where: Endpoint, response: urllib3.BaseHTTPResponse, throttled: int) -> Any:
        """Map the final answer to decoded JSON or a VendorError that says where."""
        retries = _retries_used(response) + throttled
        self.stats.record(retries=retries)
        status = response.status
        if status in (401, 403):
            raise VendorAuthError(
                f"{self.source_name} rejected our credentials ({status}) on {where.describe()}: "
                f"check {self.auth_variables}"
            )
        if status == 404:
            raise VendorNotFoundError(f"{where.describe()} answered HTTP 404: {_safe_excerpt(response)}")
        if not 200 <= status < 300:
            transient = status in RETRY_STATUSES
            hint = f" after {retries} retries" if transient else ""
            raise (VendorUnavailableError if transient else VendorError)(
                f"{where.describe()} answered HTTP {status}{hint}: {_safe_excerpt(response)}"
            )
        try:
            return json.loads(response.data)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise MalformedResponseError(
                f"{where.describe()} answered {status} with a body that is not valid JSON "
                f"({len(response.data)} bytes)"
            ) from None


def _retries_used(response: urllib3.BaseHTTPResponse) -> int:
    history = getattr(response.retries, "history", None)
    return len(history) if history else 0


def _root_cause(exc: MaxRetryError) -> str:
    """The innermost reason ("Connection refused"), without URLs or headers."""
    inner = exc.reason if exc.reason is not None else exc
    text = str(inner)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Connection reset", "Temporary failure in name resolution"):
        if marker in text:
            return marker
    return type(inner).__name__


def _safe_excerpt(response: urllib3.BaseHTTPResponse, limit: int = 200) -> str:
    """A short, single-line slice of an error body so the vendor's own message is visible."""
    text = response.data[: limit * 4].decode("utf-8", "replace")[:limit].replace("\n", " ").strip()
    return text or "(empty body)"


def run_concurrently(
    items: Iterable[T],
    fn: Callable[[T], R],
    *,
    workers: int,
    on_result: Callable[[T, R], None],
    pace: AdaptiveLimit | None = None,
) -> int:
    """Apply ``fn`` to every item on a bounded thread pool, handing results back in order.

    Results reach ``on_result`` on the calling thread and in input order, so the caller
    can stream them to disk without holding them all. At most ``2 * workers`` items are
    started ahead, or twice the client's current limit when ``pace`` is given (the limit
    then decides how many calls are in flight, and only that many threads are busy).
    The first failure cancels everything not yet started and is re-raised.
    """
    done = 0
    iterator: Iterator[T] = iter(items)
    pending: deque[tuple[T, Future[R]]] = deque()

    def window() -> int:
        return max(1, 2 * min(workers, pace.limit if pace else workers))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vendor") as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(fn, item)))
                while len(pending) >= window():
                    head, future = pending.popleft()
                    on_result(head, future.result())
                    done += 1
            while pending:
                head, future = pending.popleft()
                on_result(head, future.result())
                done += 1
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return done
