"""The M365 Usage Dashboard API over the published files, as an RSGI application for granian.

All request logic lives in ``Dashboard.respond`` (plain Python, no I/O beyond reading the
published version); ``Dashboard.__rsgi__`` only moves bytes. Answers come from precomputed
files, with two exceptions: ``/history?org`` reads the organization's body from one file by its
[offset, length] (and makes its CSV), and ``/changes`` is queried from the version's changed users'
history at request time (rule 12 between any two kept nights is too many pairs to precompute), in a
worker thread, never on the event loop, and cached.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import duckdb

from m365_pipeline import settings
from m365_pipeline.api_bodies import CONTENT_TYPES, FORMATS, SORT_FIELDS, changes_body, history_body
from m365_pipeline.history_api import BadDate, changes_database, changes_rows, night_a, parse_date
from m365_pipeline.publishing import (
    CURRENT,
    GZIP_MIN_BYTES,
    PublishedFile,
    PublishedVersion,
    current_version_dir,
    export_dir,
    http_timestamp,
)

ACCESS_LOG = logging.getLogger("m365_serve.access")
API_PREFIX = "/api/m365/"
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
MAX_QUERY_LENGTH = 8192
MAX_QUERY_FIELDS = 16
MEMORY_CACHE_BYTES = 64 << 20  # small files are served from memory, large ones by sendfile
MEMORY_FILE_LIMIT = 4 << 20
CHANGES_CACHE_ENTRIES = 256  # per version: /changes bodies by (night A, org, format)
CHANGES_CACHE_BYTES = 64 << 20
# The request headers respond() reads, copied before a request is answered in a worker thread.
REQUEST_HEADERS = ("accept-encoding", "if-none-match", "if-modified-since", "access-control-request-headers")
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
BASE_HEADERS = (
    ("access-control-allow-origin", "*"),
    ("access-control-expose-headers", "ETag, Last-Modified, Content-Disposition"),
    ("x-content-type-options", "nosniff"),
)
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: Path | None = None  # large bodies go out with sendfile instead of through Python


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


def error_response(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps({"status": "error", "error": message}, ensure_ascii=False).encode("utf-8")
    return Response(status, [*BASE_HEADERS, ("content-type", "application/json"),
                             ("cache-control", "no-store"), *(extra or [])], body)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """RFC 9110 content negotiation for one coding: gzip (or *) with a non-zero q-value."""
    if not accept_encoding:
        return False
    explicit: float | None = None
    wildcard: float | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            explicit = quality
        elif coding == "*":
            wildcard = quality
    chosen = explicit if explicit is not None else wildcard
    return bool(chosen and chosen > 0)


def etag_matches(if_none_match: str, etag: str) -> bool:
    if if_none_match.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == etag for candidate in if_none_match.split(","))


def not_modified_since(if_modified_since: str, last_modified: datetime) -> bool:
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return last_modified <= since


def parse_query(query_string: str) -> dict[str, str]:
    """Form-style decoding (%XX and + for space); each parameter at most once."""
    if len(query_string) > MAX_QUERY_LENGTH:
        raise HttpError(414, f"query string longer than {MAX_QUERY_LENGTH} characters")
    try:
        parsed = parse_qs(query_string, keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise HttpError(400, "query string is not valid UTF-8") from None
    except ValueError:
        raise HttpError(400, f"more than {MAX_QUERY_FIELDS} query parameters") from None
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise HttpError(400, f"parameter given more than once: {', '.join(repeated)[:100]}")
    return {name: values[0] for name, values in parsed.items()}


class _ByteCache:
    """Bytes of small published files, least recently used out first."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[Path, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes:
        with self._lock:
            body = self._items.get(path)
            if body is not None:
                self._items.move_to_end(path)
                return body
        body = path.read_bytes()
        with self._lock:
            if path not in self._items:
                self._items[path] = body
                self.used += len(body)
            while self.used > self.budget and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self.used -= len(evicted)
        return body


class _Changes:
    """One version's ``/changes`` answers, made at request time and kept (least recently used out first).

    The version's changed users' history is loaded into an in-memory DuckDB as soon as the version is
    seen (``prepare``, in a thread) or by the first request; marts.changes_between (the pipeline's stored
    SQL) answers rule 12 from any kept night A, for all organizations or one. Each (night A, org, format)
    is made once; concurrent first requests wait for one query.
    """

    def __init__(self, version: PublishedVersion, entries: int = CHANGES_CACHE_ENTRIES,
                 budget: int = CHANGES_CACHE_BYTES):
        self.version, self.entries, self.budget, self.used = version, entries, budget, 0
        self._db: Any = None
        self._items: OrderedDict[tuple[str, str | None, str], tuple[bytes, bytes | None, str]] = OrderedDict()
        self._pending: dict[tuple[str, str | None, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()

    def get(self, night: str, org: str | None, fmt: str) -> tuple[bytes, bytes | None, str]:
        key = (night, org, fmt)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pending = self._pending.setdefault(key, threading.Lock())
        with pending:  # one query per key; the others wait for it and find it cached
            try:
                with self._lock:
                    if key in self._items:
                        return self._items[key]
                item = self._make(night, org, fmt)
                with self._lock:
                    if (replaced := self._items.pop(key, None)) is not None:  # made again after an eviction
                        self.used -= len(replaced[0]) + len(replaced[1] or b"")
                    self._items[key] = item
                    self.used += len(item[0]) + len(item[1] or b"")
                    while len(self._items) > 1 and (len(self._items) > self.entries or self.used > self.budget):
                        _, (body, gz, _) = self._items.popitem(last=False)
                        self.used -= len(body) + len(gz or b"")
            finally:  # a failed query leaves no lock behind; a later request for the key makes its own
                with self._lock:
                    if self._pending.get(key) is pending:
                        del self._pending[key]
        return item

    def prepare(self) -> None:
        """Load the changes database ahead of the first request (run in a thread when the version is new);
        a failure is left for that request to report."""
        try:
            self._cursor().close()
        except duckdb.Error:
            pass

    def _make(self, night: str, org: str | None, fmt: str) -> tuple[bytes, bytes | None, str]:
        stamps = {n["date"]: n["last_collected"] for n in self.version.nights}
        tonight = self.version.nights[-1]["date"]
        try:
            with self._cursor() as cursor:
                rows = changes_rows(cursor, night, tonight, org)
        except duckdb.Error as exc:
            raise HttpError(500, f"the changes of this published version cannot be read ({type(exc).__name__}); "
                                 "the next pipeline run publishes them again") from None
        body = changes_body(stamps[night], stamps[tonight], rows, fmt)
        gz = gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        return body, gz, f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    def _cursor(self) -> Any:
        """A cursor (its own DuckDB connection, for this thread) on the version's changes database."""
        with self._db_lock:
            if self._db is None:
                self._db = changes_database(self.version.changed_users)
            return self._db.cursor()


class Dashboard:
    """Answers every documented path from the current published version."""

    def __init__(self, data_dir: Path, access_log: bool = False):
        self.export_root = export_dir(data_dir)
        self.access_log = access_log
        self._lock = threading.Lock()
        self._target: str | None = None
        # The current version and its /changes answers, replaced together (one assignment).
        self._serving: tuple[PublishedVersion | None, _Changes | None] = (None, None)
        self._cache = _ByteCache(MEMORY_CACHE_BYTES)
        self._static = self._load_static()

    # -- published data -------------------------------------------------------------------
    def current(self) -> PublishedVersion | None:
        """The version ``current`` points at now; re-read only when the link changes."""
        return self._current()[0]

    def _current(self) -> tuple[PublishedVersion | None, _Changes | None]:
        try:
            target = os.readlink(self.export_root / CURRENT)
        except OSError:
            return None, None
        if target != self._target:
            with self._lock:
                if target != self._target:
                    path = current_version_dir(self.export_root)
                    version = PublishedVersion(path) if path else None
                    changes = _Changes(version) if version else None
                    if version is not None and version.changed_users is not None and len(version.nights) > 1:
                        threading.Thread(target=changes.prepare, name="changes-database", daemon=True).start()
                    self._serving = (version, changes)
                    self._target = target
                    self._cache = _ByteCache(MEMORY_CACHE_BYTES)
        return self._serving

    # -- request handling -----------------------------------------------------------------
    def respond(self, method: str, path: str, query_string: str, headers: Any) -> Response:
        try:
            if method == "OPTIONS":
                return self._preflight(headers)
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"method {method[:20]} is not allowed; use GET",
                                [("allow", ALLOWED_METHODS)])
            if path in self._static:
                return self._conditional(headers, *self._static[path])
            if not path.startswith(API_PREFIX):
                raise HttpError(404, "not found")
            endpoint = path[len(API_PREFIX):]
            if endpoint not in ("summary", "users", "export", "history", "changes", "coverage"):
                raise HttpError(404, "not found")
            params = parse_query(query_string)
            version, changes = self._current()
            if version is None:
                raise HttpError(404, "no data available: nothing has been published yet "
                                     "(run the pipeline, e.g. `make demo`)")
            if endpoint in ("history", "changes"):
                return self._nights_route(endpoint, params, version, changes, headers)
            published, disposition = self._route(endpoint, params, version)
            return self._published(headers, published, version, disposition)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.headers)

    def _route(self, endpoint: str, params: dict[str, str], version: PublishedVersion
               ) -> tuple[PublishedFile, str | None]:
        if endpoint == "summary":
            return version.summary(), None
        if endpoint == "coverage":
            return self._route_coverage(params, version)
        if endpoint == "users":
            org = params.get("org")
            if not org:
                raise HttpError(400, "missing required parameter: org")
            published = version.users(org)
            if published is None:
                raise HttpError(404, f"organization not found: {org[:200]}")
            return published, None
        fmt = params.get("format", "json")
        sort = params.get("sort", "organization_name")
        if fmt not in FORMATS:
            raise HttpError(400, f"unknown format {fmt[:40]!r}; use one of: {', '.join(FORMATS)}")
        if sort not in SORT_FIELDS:
            raise HttpError(400, f"unknown sort {sort[:40]!r}; use one of: {', '.join(SORT_FIELDS)}")
        disposition = None
        if fmt == "csv":
            day = version.published_at.strftime("%Y-%m-%d")
            disposition = f'attachment; filename="m365-users-{day}.csv"'
        return version.export(sort, fmt), disposition

    @staticmethod
    def _route_coverage(params: dict[str, str], version: PublishedVersion) -> tuple[PublishedFile, str | None]:
        """GET /api/m365/coverage[?org=NAME][&format=json|csv] (docs/RULES.md, rule 13)."""
        fmt = params.get("format", "json")
        if fmt not in FORMATS:
            raise HttpError(400, f"unknown format {fmt[:40]!r}; use one of: {', '.join(FORMATS)}")
        org = params.get("org")
        if org is not None and not org:
            raise HttpError(400, "parameter org is empty; omit it for every organization")
        if not version.has_coverage:
            raise HttpError(404, "backup coverage is not available: source B (the backup reseller, "
                                 "BACKUP_API_BASE_URL) was not configured when this data was published")
        published = version.coverage(org, fmt)
        if published is None:
            raise HttpError(404, f"organization not found: {org[:200]}")
        disposition = None
        if fmt == "csv":
            day = version.published_at.strftime("%Y-%m-%d")
            # Only safe characters of the name reach the header; the body holds the exact name.
            slug = "" if org is None else "-" + re.sub(r"[^A-Za-z0-9]+", "-", org).strip("-")[:60]
            disposition = f'attachment; filename="m365-coverage-{day}{slug.rstrip("-")}.csv"'
        return published, disposition

    # -- history and changes (docs/RULES.md, rules 11 and 12) --------------------------------
    def _nights_route(self, endpoint: str, params: dict[str, str], version: PublishedVersion, changes: _Changes,
                      headers: Any) -> Response:
        fmt = params.get("format", "json")
        if fmt not in FORMATS:
            raise HttpError(400, f"unknown format {fmt[:40]!r}; use one of: {', '.join(FORMATS)}")
        org = params.get("org")
        if org == "":
            raise HttpError(400, "org must not be empty; leave it out for all organizations")
        if org is not None and org not in version.history_organizations:
            raise HttpError(404, f"organization not found on any kept night: {org[:200]}")
        if not version.nights:
            if endpoint == "history":  # zero kept nights: zero rows (a version published before nights were kept)
                body = history_body(None, [], fmt)
                return self._generated(headers, version, body, None, f'"{hashlib.sha256(body).hexdigest()[:32]}"',
                                       CONTENT_TYPES[fmt], None)
            raise HttpError(404, "no night is kept yet")
        tonight = version.nights[-1]["date"]
        if endpoint == "history":
            disposition = f'attachment; filename="m365-history-{tonight}.csv"' if fmt == "csv" else None
            if org is not None and version.organization_history is not None:
                offset, length = version.history_organizations[org]
                with version.organization_history.open("rb") as history:
                    history.seek(offset)
                    body = history.read(length)  # the organization's JSON body; its CSV is made from it
                if fmt == "csv":
                    body = history_body(org, json.loads(body)["history"], fmt)
                gz = gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
                return self._generated(headers, version, body, gz, f'"{hashlib.sha256(body).hexdigest()[:32]}"',
                                       CONTENT_TYPES[fmt], disposition)
            key = version.history_organizations[org] if org is not None else None  # older versions: a file each
            return self._published(headers, version.history(fmt, key), version, disposition)
        since = params.get("since")
        if since is not None:
            try:
                since = parse_date(since)
            except BadDate as exc:
                raise HttpError(400, str(exc)) from None
        dates = [night["date"] for night in version.nights]
        night = night_a(dates, since)
        if night is None:
            raise HttpError(404, f"no kept night on or before {since}" if since is not None
                            else "only one night is kept: there is no earlier night to compare with")
        disposition = f'attachment; filename="m365-changes-{night}-to-{tonight}.csv"' if fmt == "csv" else None
        if version.changed_users is None:
            return self._changes_of_an_older_version(headers, version, night, org, fmt, disposition)
        body, gz, etag = changes.get(night, org, fmt)
        return self._generated(headers, version, body, gz, etag, CONTENT_TYPES[fmt], disposition)

    def _changes_of_an_older_version(self, headers: Any, version: PublishedVersion, night: str, org: str | None,
                                     fmt: str, disposition: str | None) -> Response:
        """Versions published before the changed users' history held a changes file per kept night (from
        it to their tonight): served as they are, or selected for ``org``, until the next run publishes."""
        if f"changes:json:{night}" not in version.files:
            raise HttpError(404, "changes are not available in this version: it was published before the "
                                 "pipeline kept them; the next pipeline run publishes them")
        if org is None:
            return self._published(headers, version.files[f"changes:{fmt}:{night}"], version, disposition)
        published = json.loads(version.files[f"changes:json:{night}"].path.read_bytes())
        rows = [row for row in published["changes"]
                if org in (row["organization_name"], row["previous_organization_name"])]
        body = changes_body(published["from"], published["to"], rows, fmt)
        gz = gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        return self._generated(headers, version, body, gz, f'"{hashlib.sha256(body).hexdigest()[:32]}"',
                               CONTENT_TYPES[fmt], disposition)

    def _generated(self, headers: Any, version: PublishedVersion, body: bytes, gz: bytes | None, etag: str,
                   content_type: str, disposition: str | None) -> Response:
        """Like ``_published`` for a body made from the published version at request time (and cached)."""
        encoding = []
        if gz is not None and accepts_gzip(headers.get("accept-encoding")):
            body, etag, encoding = gz, etag[:-1] + '-gzip"', [("content-encoding", "gzip")]
        common = [*BASE_HEADERS, ("cache-control", "no-cache"), ("vary", "Accept-Encoding"), ("etag", etag),
                  ("last-modified", version.last_modified)]
        if self._fresh(headers, etag, version.published_at):
            return Response(304, common)
        out = [*common, ("content-type", content_type), *encoding]
        if disposition:
            out.append(("content-disposition", disposition))
        return Response(200, out, body)

    def _published(self, headers: Any, published: PublishedFile, version: PublishedVersion,
                   disposition: str | None) -> Response:
        path, size, etag, encoding = published.path, published.size, published.etag, []
        if published.gzip_path is not None and accepts_gzip(headers.get("accept-encoding")):
            # Another representation, so another strong validator (RFC 9110 8.8.3).
            path, size, etag = published.gzip_path, published.gzip_size or 0, published.etag[:-1] + '-gzip"'
            encoding = [("content-encoding", "gzip")]
        validators = [("etag", etag), ("last-modified", version.last_modified)]
        common = [*BASE_HEADERS, ("cache-control", "no-cache"), ("vary", "Accept-Encoding"), *validators]
        if self._fresh(headers, etag, version.published_at):
            return Response(304, common)
        out = [*common, ("content-type", published.content_type), *encoding]
        if disposition:
            out.append(("content-disposition", disposition))
        if size > MEMORY_FILE_LIMIT:
            return Response(200, out, file=path)
        return Response(200, out, self._cache.get(path))

    @staticmethod
    def _fresh(headers: Any, etag: str, last_modified: datetime) -> bool:
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None:
            return etag_matches(if_none_match, etag)
        since = headers.get("if-modified-since")
        return since is not None and not_modified_since(since, last_modified)

    def _conditional(self, headers: Any, body: bytes, content_type: str, etag: str, modified: datetime
                     ) -> Response:
        common = [*BASE_HEADERS, ("cache-control", "no-cache"), ("etag", etag),
                  ("last-modified", http_timestamp(modified)), ("content-security-policy", PAGE_CSP)]
        if self._fresh(headers, etag, modified):
            return Response(304, common)
        return Response(200, [*common, ("content-type", content_type)], body)

    @staticmethod
    def _preflight(headers: Any) -> Response:
        requested = headers.get("access-control-request-headers") or ""
        allowed = ", ".join(h.strip() for h in requested.split(",")
                            if h.strip() and all(c.isalnum() or c in "-_" for c in h.strip()))[:500]
        out = [*BASE_HEADERS, ("access-control-allow-methods", ALLOWED_METHODS), ("allow", ALLOWED_METHODS),
               ("access-control-max-age", "86400")]
        if allowed:
            out.append(("access-control-allow-headers", allowed))
        return Response(204, out)

    @staticmethod
    def _load_static() -> dict[str, tuple[bytes, str, str, datetime]]:
        import hashlib

        package = resources.files("m365_pipeline.server").joinpath("static")
        started = datetime.now(UTC).replace(microsecond=0)
        loaded = {}
        for route, (name, content_type) in STATIC_FILES.items():
            resource = package.joinpath(name)
            if resource.is_file():
                body = resource.read_bytes()
                etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
                loaded[route] = (body, content_type, etag, started)
        return loaded

    # -- RSGI -------------------------------------------------------------------------------
    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        started = time.perf_counter()
        if scope.path == API_PREFIX + "changes" and scope.method in ("GET", "HEAD"):  # may query DuckDB
            headers = {name: scope.headers.get(name) for name in REQUEST_HEADERS}
            response = await asyncio.to_thread(self.respond, scope.method, scope.path, scope.query_string, headers)
        else:
            response = self.respond(scope.method, scope.path, scope.query_string, scope.headers)
        self._send(scope, protocol, response)
        if self.access_log:
            target = scope.path + ("?" + scope.query_string if scope.query_string else "")
            ACCESS_LOG.info('%s "%s %s" %d %.1fms', scope.client, log_safe(scope.method, 20),
                            log_safe(target, 500), response.status, (time.perf_counter() - started) * 1000)

    @staticmethod
    def _send(scope: Any, protocol: Any, response: Response) -> None:
        if scope.method == "HEAD" or response.status in (204, 304):
            length = response.file.stat().st_size if response.file else len(response.body)
            headers = response.headers if response.status in (204, 304) else \
                [*response.headers, ("content-length", str(length))]
            protocol.response_empty(response.status, headers)
        elif response.file is not None:
            protocol.response_file(response.status, response.headers, str(response.file))
        else:
            protocol.response_bytes(response.status, response.headers, response.body)


def _escape_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def log_safe(text: str, limit: int) -> str:
    """One log line per request, whatever the client sent: quotes and control characters escaped."""
    text = text[:limit]
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(map(_escape_char, text))


def create_app() -> Dashboard:
    """granian factory: settings come from the environment ``m365-serve`` sets for its workers."""
    access_log = os.environ.get("M365_ACCESS_LOG") == "1"
    if access_log and not ACCESS_LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        ACCESS_LOG.addHandler(handler)
        ACCESS_LOG.setLevel(logging.INFO)
        ACCESS_LOG.propagate = False
    return Dashboard(settings.data_dir(), access_log=access_log)
