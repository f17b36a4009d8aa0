"""The M365 Usage Dashboard API over the published files, as an RSGI application for granian.

All request logic lives in ``Dashboard.respond`` (plain Python, no I/O beyond reading the
published version); ``Dashboard.__rsgi__`` only moves bytes. The rooms: ``http.py`` (HTTP semantics),
``access.py`` (who may read, CORS), ``page.py`` (the dashboard's files), ``routes.py`` (each API path over
the published version) and ``published.py`` (the current version, its bytes and request-time bodies).
Answers come from precomputed files, with two exceptions: ``/history?org`` reads the organization's body
from one file by its [offset, length] (and makes its CSV), and ``/changes`` is queried from the version's
changed users' history at request time (rule 12 between any two kept nights is too many pairs to
precompute), in a worker thread, never on the event loop, and cached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from m365_pipeline import settings
from m365_pipeline.publishing import PublishedVersion, export_dir

from .access import Access, preflight
from .connections import WATCH_VARIABLE, ConnectionWatch
from .http import ALLOWED_METHODS, HttpError, Response, accepts_gzip, error_response, parse_query
from .page import Page
from .published import Serving
from .routes import API_PREFIX, ENDPOINTS, route

__all__ = ["API_PREFIX", "Dashboard", "create_app"]

ACCESS_LOG = logging.getLogger("m365_serve.access")
MAX_ANSWERS = 4096  # bodies are the byte cache's own objects (or /changes' cached ones): only headers are added
# The request headers respond() reads, copied before a request is answered in a worker thread.
REQUEST_HEADERS = ("authorization", "origin", "accept-encoding", "if-none-match", "if-modified-since",
                   "access-control-request-headers")


class Dashboard:
    """Answers every documented path from the current published version."""

    def __init__(self, data_dir: Path, access_log: bool = False, watch: ConnectionWatch | None = None,
                 access: Access | None = None):
        self.export_root = export_dir(data_dir)
        self.access = access or Access()
        self.access_log = access_log
        self.watch = watch
        self._serving = Serving(self.export_root)
        self._page = Page()
        # 200s of unconditional requests by (path, query, gzip, CORS variant), for one version target.
        self._answers: tuple[str | None, dict[tuple, Response]] = (None, {})

    def current(self) -> PublishedVersion | None:
        """The version ``current`` points at now."""
        return self._serving.current()[0]

    def respond(self, method: str, path: str, query_string: str, headers: Any) -> Response:
        """The answer; an unconditional GET or HEAD that was a 200 before on this version is answered from
        ``_answers`` (the same headers and bytes, made once), after the token check as every request."""
        if method not in ("GET", "HEAD") or headers.get("if-none-match") is not None or \
                headers.get("if-modified-since") is not None:
            return self._finish(self._respond(method, path, query_string, headers), headers)
        try:
            self.access.check(headers)
        except HttpError as exc:
            return self._finish(error_response(exc.status, exc.message, exc.headers), headers)
        target = self._serving.target()
        key = (path, query_string, accepts_gzip(headers.get("accept-encoding")), self.access.cors_key(headers))
        answers = self._answers
        if answers[0] == target and (known := answers[1].get(key)) is not None:
            return known
        response = self._finish(self._respond(method, path, query_string, headers, checked=True), headers)
        if response.status == 200 and response.file is None:
            if answers[0] != target or len(answers[1]) >= MAX_ANSWERS:
                answers = self._answers = (target, {})  # a new version (or too many): start again
            answers[1][key] = response
        return response

    def _finish(self, response: Response, headers: Any) -> Response:
        response.headers[:0] = self.access.cors_headers(headers)
        return response

    def _respond(self, method: str, path: str, query_string: str, headers: Any, checked: bool = False) -> Response:
        try:
            if method == "OPTIONS":
                return preflight(headers)
            if not checked:
                self.access.check(headers)
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"method {method[:20]} is not allowed; use GET",
                                [("allow", ALLOWED_METHODS)])
            if path in self._page:
                return self._page.respond(path, headers)
            if not path.startswith(API_PREFIX):
                raise HttpError(404, "not found")
            endpoint = path[len(API_PREFIX):]
            if endpoint not in ENDPOINTS:
                raise HttpError(404, "not found")
            params = parse_query(query_string)
            version, changes, cache = self._serving.current()
            if version is None:
                raise HttpError(404, "no data available: nothing has been published yet "
                                     "(run the pipeline, e.g. `make demo`)")
            return route(endpoint, params, version, changes, cache, headers)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.headers)

    # -- RSGI -------------------------------------------------------------------------------
    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        started = time.perf_counter() if self.access_log else 0.0
        if self.watch is not None:
            self.watch.request_started(scope.client)
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
    watch = None
    if os.environ.get(WATCH_VARIABLE):  # port, head timeout, keep-alive timeout, max per client
        port, head, keep_alive, per_client = os.environ[WATCH_VARIABLE].split(",")
        watch = ConnectionWatch(int(port), float(head), float(keep_alive), int(per_client))
        watch.start()
    return Dashboard(settings.data_dir(), access_log=access_log, watch=watch, access=Access.from_environment())
