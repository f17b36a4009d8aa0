"""HTTP plumbing shared by both vendor clients.

Retries, backoff and ``Retry-After`` handling are urllib3's ``Retry`` on a pooled
urllib3 ``PoolManager``; this module only turns what comes back into errors a data
engineer can act on. Tokens travel in headers only, and no message built
here ever contains a header value.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import make_headers
from urllib3.util.retry import Retry

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
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
        return {
            "vendor_calls": self.calls,
            "vendor_retries": self.retries,
            "pages": self.pages,
            "elapsed_s": round(elapsed, 3),
            "calls_per_s": round(self.calls / elapsed, 1) if elapsed > 0 else 0.0,
        }


@dataclass(frozen=True)
class HttpSettings:
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_factor: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: int = 120
    pool_size: int = 16


def build_pool(settings: HttpSettings, base_headers: dict[str, str]) -> urllib3.PoolManager:
    """A connection pool that retries connection errors, 429 and 5xx with backoff."""
    retry = Retry(
        total=settings.max_retries,
        connect=settings.max_retries,
        read=settings.max_retries,
        status=settings.max_retries,
        other=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=settings.backoff_factor,
        backoff_max=settings.backoff_max_s,
        respect_retry_after_header=True,
        retry_after_max=settings.retry_after_max_s,
        raise_on_status=False,
        raise_on_redirect=True,
        # A redirect to another host never carries our credentials along.
        remove_headers_on_redirect=Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT | set(TOKEN_HEADERS),
    )
    # urllib3 without requests on top: requests' per-call overhead halved the calls/s of the
    # per-user pull (bench/RESULTS.md: 1.15k -> 2.3k calls/s against the simulator, 0.82 -> 0.41 ms CPU/call).
    # urllib3 never reads proxy variables, so a stray one cannot reroute vendor traffic.
    return urllib3.PoolManager(
        num_pools=2,
        maxsize=settings.pool_size,
        block=True,
        retries=retry,
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
        self.stats = CallStats()

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
        try:
            response = self.pool.request(
                "GET", url, fields=params,
                headers={**self.pool.headers, **headers} if headers else None,  # merged, not replaced
            )
        except MaxRetryError as exc:
            self.stats.record(retries=self.settings.max_retries, page=False)
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
        except HTTPError as exc:
            self.stats.record(retries=0, page=False)
            raise VendorError(f"{where.describe()} failed: {type(exc).__name__}") from None

        retries = _retries_used(response)
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
) -> int:
    """Apply ``fn`` to every item on a bounded thread pool, handing results back in order.

    Results reach ``on_result`` on the calling thread and in input order, so the caller
    can stream them to disk without holding them all; at most ``2 * workers`` calls are
    in flight. The first failure cancels everything not yet started and is re-raised.
    """
    done = 0
    window = max(1, workers * 2)
    iterator: Iterator[T] = iter(items)
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vendor") as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(fn, item)))
                while len(pending) >= window:
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
