"""Deterministic, bounded fault injection for the vendor simulator.

Every decision is a pure function of (seed, request target = path+query, how often that target was
already faulted), so a run with the same seed and the same requests sees the same faults whatever
the thread interleaving. Transient faults (``fail_once``, ``slow_match``, ``rate_429``, ``rate_5xx``,
``reset_rate``) share one budget per target: a target is faulted at most ``max_faults_per_url``
times, so a client that retries enough always gets through. ``malformed_match``,
``missing_field_match``, ``down_after`` and the hostile answers (``oversize_match``, ``gzip_bomb_match``,
``claim_pages_match``, ``endless_next_match``, ``echo_headers_on_error``) are permanent by design.

Only targets that were faulted (or matched ``fail_once``) are remembered, which keeps memory
proportional to the faults, not to the requests, on million-user pulls.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SOURCES = ("saas", "backup")
SCOPES = ("saas", "backup", "both")
DELETE_MOMENTS = ("after_first_page", "after_last_page")
OWNER_DELETE_MOMENTS = ("after_detail", "at_tenants", "at_accounts")
MAX_RATE_BURST = 1_000_000
MAX_HOSTILE_MIB = 1024  # the largest oversized or inflated answer: the 1 GiB bomb
CLAIMED_TOTAL_PAGES = 10**9  # what ``claim_pages_match`` pages say


HOSTILE_MATCHES = ("oversize_match", "gzip_bomb_match", "claim_pages_match", "endless_next_match")


@dataclass(frozen=True)
class FaultConfig:
    """What to break; the defaults break nothing. Regexes are searched in the request's path+query."""

    scope: str = "both"  # which source the latency and the random faults apply to
    latency_ms: int = 0
    jitter_ms: int = 0  # each delayed answer takes latency_ms plus or minus up to this
    rate_limit: float = 0.0  # requests/s per API token (a token bucket answering 429); 0 = none
    rate_burst: int = 20  # the bucket's size: a vendor allowing a small burst, then rate_limit a second
    slow_match: str | None = None
    slow_ms: int = 0
    rate_429: float = 0.0
    retry_after: int = 1
    rate_5xx: float = 0.0
    fail_once: str | None = None
    reset_rate: float = 0.0
    malformed_match: str | None = None
    missing_field_match: str | None = None
    down_after: int | None = None
    down_scope: str = "both"
    max_faults_per_url: int = 2
    # A list that changes under the pull: the first user of source S's list is deleted at the vendor
    # right after page 1 ("after_first_page": later pages shift by one) or every page, in whatever order
    # they were asked for ("after_last_page": the list read is whole, the user's subscriptions then answer
    # 404), was served.
    delete_saas_user: str | None = None
    # The same on source B: the first account of the largest m365 tenant's list is deleted right after page 1
    # of that list was served ("after_first_page": later pages shift by one).
    delete_backup_account: str | None = None
    # An organization owner (the first GET /users lists) deleted at source B mid-pull: right after its
    # GET /users/{id} was served ("after_detail": later listings leave it out), or when its tenants
    # ("at_tenants") or its first tenant's accounts ("at_accounts") are asked for (that call answers 404).
    delete_backup_owner: str | None = None
    # Hostile answers (rule 19 and issue 25), on the matching 2xx answers. ``oversize_match``: the JSON is
    # followed by whitespace up to ``oversize_mib`` MiB (still valid JSON). ``gzip_bomb_match``: sent with
    # ``Content-Encoding: gzip``, a small body inflating to ``gzip_bomb_mib`` MiB (whitespace, then the
    # JSON). ``claim_pages_match`` (source S): the page claims CLAIMED_TOTAL_PAGES pages, total_items
    # unchanged. ``endless_next_match`` (source B): the page always links a next page, past the end too.
    oversize_match: str | None = None
    oversize_mib: int = 65
    gzip_bomb_match: str | None = None
    gzip_bomb_mib: int = 1024
    claim_pages_match: str | None = None
    endless_next_match: str | None = None
    # A vendor's debug page: every 4xx/5xx answer's body lists every request header (tokens included), and
    # its ``X-Debug-Request-Token`` header repeats the request's token (source S's bearer, source B's
    # X-Access-Token).
    echo_headers_on_error: bool = False

    def __post_init__(self) -> None:
        for name in ("scope", "down_scope"):
            if getattr(self, name) not in SCOPES:
                raise ValueError(f"{name} must be one of {', '.join(SCOPES)}, not {getattr(self, name)!r}")
        for name, moments in (("delete_saas_user", DELETE_MOMENTS), ("delete_backup_account", DELETE_MOMENTS[:1]),
                              ("delete_backup_owner", OWNER_DELETE_MOMENTS)):
            if getattr(self, name) not in (None, *moments):
                raise ValueError(f"{name} must be one of {', '.join(moments)}")
        for name in ("rate_429", "rate_5xx", "reset_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        if self.rate_429 + self.rate_5xx + self.reset_rate > 1.0:
            raise ValueError("rate_429 + rate_5xx + reset_rate must not exceed 1")
        for name in ("latency_ms", "jitter_ms", "rate_limit", "slow_ms", "retry_after", "max_faults_per_url"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name, high in (("rate_burst", MAX_RATE_BURST), ("oversize_mib", MAX_HOSTILE_MIB),
                           ("gzip_bomb_mib", MAX_HOSTILE_MIB)):
            if not 1 <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be between 1 and {high}, not {getattr(self, name)}")
        if self.jitter_ms > self.latency_ms:
            raise ValueError("jitter_ms must not exceed latency_ms")
        if self.down_after is not None and self.down_after < 0:
            raise ValueError("down_after must not be negative")
        for name in HOSTILE_MATCHES + ("slow_match", "fail_once", "malformed_match", "missing_field_match"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regular expression: {exc}") from None


@dataclass
class Plan:
    """What the server must do to one request before (or instead of) answering it normally."""

    delay_s: float = 0.0
    status: int | None = None  # answer with this error instead of the real response
    retry_after: int | None = None
    reset: bool = False  # drop the connection without any response
    malformed: bool = False  # a 2xx body is truncated (checked after routing)
    missing_field: bool = False  # a 2xx body loses one record's key field
    hostile: frozenset[str] = frozenset()  # the HOSTILE_MATCHES that match (applied to a 2xx answer)


class Counters:
    """Thread-safe request, fault and response counters behind ``Simulator.stats()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, Counter[str]] = {"requests": Counter(), "faults": Counter(),
                                                    "responses": Counter(), "connections": Counter()}

    def add(self, group: str, key: str) -> None:
        with self._lock:
            self._counters[group][key] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {group: dict(counter) for group, counter in self._counters.items()}
        out["requests_total"] = sum(out["requests"].values())
        return out


@dataclass
class _TargetState:
    attempts: int = 0
    faults: int = 0
    failed_once: bool = False


class FaultInjector:
    """Decides, per request, which fault (if any) to inject."""

    def __init__(self, config: FaultConfig, seed: int, counters: Counters) -> None:
        self.config = config
        self._seed = seed
        self._counters = counters
        self._lock = threading.Lock()
        self._targets: dict[str, _TargetState] = {}
        self._source_requests: Counter[str] = Counter()
        self._slow = _compile(config.slow_match)
        self._fail_once = _compile(config.fail_once)
        self._malformed = _compile(config.malformed_match)
        self._missing = _compile(config.missing_field_match)
        self._hostile = [(name, pattern) for name in HOSTILE_MATCHES
                         if (pattern := _compile(getattr(config, name))) is not None]
        self._random_total = config.rate_429 + config.rate_5xx + config.reset_rate
        self._jitter = random.Random(seed)
        self._buckets = TokenBuckets(config.rate_limit, config.rate_burst)
        # No fault that acts per request before the answer (the rate limit is ``throttle``'s): ``plan`` has nothing
        # to decide or remember, the common case of a pull's million calls.
        self._inert = (config.down_after is None and not config.latency_ms and not self._random_total and not any(
            (self._slow, self._fail_once, self._malformed, self._missing, self._hostile)))

    def plan(self, source: str | None, target: str) -> Plan:
        if self._inert:
            return Plan()
        cfg = self.config
        if source is not None and cfg.down_after is not None and cfg.down_scope in ("both", source):
            with self._lock:
                self._source_requests[source] += 1
                down = self._source_requests[source] > cfg.down_after
            if down:
                self._counters.add("faults", "down")
                return Plan(status=503)
        in_scope = source is not None and cfg.scope in ("both", source)
        plan = Plan(malformed=_matches(self._malformed, target), missing_field=_matches(self._missing, target),
                    hostile=frozenset(name for name, pattern in self._hostile if pattern.search(target)))
        if in_scope and cfg.latency_ms:
            jitter = self._jitter.uniform(-cfg.jitter_ms, cfg.jitter_ms) if cfg.jitter_ms else 0.0
            plan.delay_s += (cfg.latency_ms + jitter) / 1000
            self._counters.add("faults", "latency")
        kind = self._transient(target, in_scope)
        if kind == "fail_once":
            plan.status = 503
        elif kind == "slow":
            plan.delay_s += cfg.slow_ms / 1000
        elif kind == "429":
            plan.status, plan.retry_after = 429, cfg.retry_after
        elif kind == "5xx":
            plan.status = (500, 502, 503)[stable_hash(self._seed, "code", target) % 3]
        elif kind == "reset":
            plan.reset = True
        if kind:
            self._counters.add("faults", kind)
        return plan

    def _transient(self, target: str, in_scope: bool) -> str | None:
        cfg = self.config
        fail_once = _matches(self._fail_once, target)
        with self._lock:
            state = self._targets.get(target)
            attempt = state.attempts if state else 0
            kind = None
            if (state.faults if state else 0) < cfg.max_faults_per_url:
                if fail_once and not (state and state.failed_once):
                    kind = "fail_once"
                elif _matches(self._slow, target):
                    kind = "slow"
                elif in_scope and self._random_total:
                    # One uniform draw per (target, attempt) split into the three random fault bands.
                    u = stable_hash(self._seed, "fault", target, attempt) / 2**128
                    if u < cfg.reset_rate:
                        kind = "reset"
                    elif u < cfg.reset_rate + cfg.rate_429:
                        kind = "429"
                    elif u < self._random_total:
                        kind = "5xx"
            if kind or state or fail_once:
                state = state or self._targets.setdefault(target, _TargetState())
                state.attempts += 1
                state.faults += kind is not None
                state.failed_once = state.failed_once or kind == "fail_once"
        return kind

    def throttle(self, plan: Plan, source: str | None, token: str | None) -> None:
        """Answer 429 with the bucket's Retry-After when this token is over its rate limit."""
        if source is None or not self.config.rate_limit or plan.status is not None or plan.reset:
            return
        wait = self._buckets.take((source, token or ""))
        if wait is not None:
            plan.status, plan.retry_after = 429, wait
            self._counters.add("faults", "rate_limit")

    def record(self, kind: str) -> None:
        """Count a fault the server applied after routing (malformed, missing_field)."""
        self._counters.add("faults", kind)


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up. Over it, ``take`` says
    when the next token is there: 1 s at any rate of at least one a second, as a vendor's ``Retry-After: 1``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._lock = threading.Lock()
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: object) -> int | None:
        """None when a token was taken; else the whole seconds until one is there (Retry-After)."""
        now = self._clock()
        with self._lock:
            tokens, when = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern else None


def _matches(pattern: re.Pattern[str] | None, target: str) -> bool:
    return bool(pattern and pattern.search(target))


def stable_digest(*parts: object, size: int = 16) -> bytes:
    """A ``size``-byte digest of ``parts`` that, unlike ``hash()``, is the same in every process."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=size).digest()


def stable_hash(*parts: object, size: int = 16) -> int:
    return int.from_bytes(stable_digest(*parts, size=size), "big")
