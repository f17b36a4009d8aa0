"""The published version being served: which one is current, its files' bytes, and its answers made at
request time (``/changes``), each with the validators and gzip twin the HTTP layer negotiates."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import duckdb

from m365_pipeline.api_bodies import changes_body
from m365_pipeline.history_api import changes_database, changes_rows
from m365_pipeline.publishing import CURRENT, PublishedFile, PublishedVersion, current_version_dir

from .http import BASE_HEADERS, HttpError, Representation, Response, accepts_gzip, fresh, gzip_etag, represent

MEMORY_CACHE_BYTES = 64 << 20  # small files are served from memory, large ones by sendfile
MEMORY_FILE_LIMIT = 4 << 20
CHANGES_CACHE_ENTRIES = 256  # per version: /changes bodies by (night A, org, format)
CHANGES_CACHE_BYTES = 64 << 20


class ByteCache:
    """Bytes of small published files, least recently used out first."""

    def __init__(self, budget: int = MEMORY_CACHE_BYTES):
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


class Changes:
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
        self._items: OrderedDict[tuple[str, str | None, str], Representation] = OrderedDict()
        self._pending: dict[tuple[str, str | None, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()

    def get(self, night: str, org: str | None, fmt: str) -> Representation:
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
                        self.used -= replaced.size
                    self._items[key] = item
                    self.used += item.size
                    while len(self._items) > 1 and (len(self._items) > self.entries or self.used > self.budget):
                        _, evicted = self._items.popitem(last=False)
                        self.used -= evicted.size
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

    def _make(self, night: str, org: str | None, fmt: str) -> Representation:
        stamps = {n["date"]: n["last_collected"] for n in self.version.nights}
        tonight = self.version.nights[-1]["date"]
        try:
            with self._cursor() as cursor:
                rows = changes_rows(cursor, night, tonight, org)
        except duckdb.Error as exc:
            raise HttpError(500, f"the changes of this published version cannot be read ({type(exc).__name__}); "
                                 "the next pipeline run publishes them again") from None
        return represent(changes_body(stamps[night], stamps[tonight], rows, fmt))

    def _cursor(self) -> Any:
        """A cursor (its own DuckDB connection, for this thread) on the version's changes database."""
        with self._db_lock:
            if self._db is None:
                self._db = changes_database(self.version.changed_users)
            return self._db.cursor()


class Serving:
    """The version ``export/current`` points at, its ``/changes`` answers and its file bytes; re-read only
    when the link changes, and replaced together (one assignment)."""

    def __init__(self, export_root: Path):
        self.export_root = export_root
        self._link = str(export_root / CURRENT)  # read on every request: a str, not a Path to join each time
        self._lock = threading.Lock()
        self._target: str | None = None
        self._serving: tuple[PublishedVersion | None, Changes | None, ByteCache] = (None, None, ByteCache())

    def target(self) -> str | None:
        """Where ``current`` points now (one readlink): a version's name, or None."""
        try:
            return os.readlink(self._link)
        except OSError:
            return None

    def current(self) -> tuple[PublishedVersion | None, Changes | None, ByteCache]:
        target = self.target()
        if target is None:
            return None, None, self._serving[2]
        if target != self._target:
            with self._lock:
                if target != self._target:
                    path = current_version_dir(self.export_root)
                    version = PublishedVersion(path) if path else None
                    changes = Changes(version) if version else None
                    if version is not None and version.changed_users is not None and len(version.nights) > 1:
                        threading.Thread(target=changes.prepare, name="changes-database", daemon=True).start()
                    self._serving = (version, changes, ByteCache())
                    self._target = target
        return self._serving


def _answer(headers: Any, etag: str, version: PublishedVersion, content_type: str, encoding: list,
            disposition: str | None) -> tuple[list[tuple[str, str]], Response | None]:
    """Headers of a 200 for a representation of ``version``, or the 304 when the client's copy is current."""
    common = [*BASE_HEADERS, ("cache-control", "no-cache"), ("vary", "Accept-Encoding"), ("etag", etag),
              ("last-modified", version.last_modified)]
    if fresh(headers, etag, version.published_at):
        return common, Response(304, common)
    out = [*common, ("content-type", content_type), *encoding]
    if disposition:
        out.append(("content-disposition", disposition))
    return out, None


def generated_response(headers: Any, version: PublishedVersion, made: Representation, content_type: str,
                       disposition: str | None) -> Response:
    """Like ``file_response`` for a body made from the published version at request time (and cached)."""
    body, etag, encoding = made.body, made.etag, []
    if made.gz is not None and accepts_gzip(headers.get("accept-encoding")):
        body, etag, encoding = made.gz, gzip_etag(made.etag), [("content-encoding", "gzip")]
    out, not_modified = _answer(headers, etag, version, content_type, encoding, disposition)
    return not_modified or Response(200, out, body)


def file_response(headers: Any, published: PublishedFile, version: PublishedVersion, disposition: str | None,
                  cache: ByteCache) -> Response:
    path, size, etag, encoding = published.path, published.size, published.etag, []
    if published.gzip_path is not None and accepts_gzip(headers.get("accept-encoding")):
        path, size, etag = published.gzip_path, published.gzip_size or 0, gzip_etag(published.etag)
        encoding = [("content-encoding", "gzip")]
    out, not_modified = _answer(headers, etag, version, published.content_type, encoding, disposition)
    if not_modified:
        return not_modified
    if size > MEMORY_FILE_LIMIT:
        return Response(200, out, file=path)
    return Response(200, out, cache.get(path))
