"""The dashboard page's own files (``static/``), served from memory with their validators and a CSP."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import Any

from m365_pipeline.publishing import http_timestamp

from .http import BASE_HEADERS, Response, fresh, strong_etag

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class Page:
    def __init__(self) -> None:
        package = resources.files("m365_pipeline.server").joinpath("static")
        started = datetime.now(UTC).replace(microsecond=0)
        self.files: dict[str, tuple[bytes, str, str, datetime]] = {}
        for route, (name, content_type) in STATIC_FILES.items():
            resource = package.joinpath(name)
            if resource.is_file():
                body = resource.read_bytes()
                self.files[route] = (body, content_type, strong_etag(body), started)

    def __contains__(self, path: str) -> bool:
        return path in self.files

    def respond(self, path: str, headers: Any) -> Response:
        body, content_type, etag, modified = self.files[path]
        common = [*BASE_HEADERS, ("cache-control", "no-cache"), ("etag", etag),
                  ("last-modified", http_timestamp(modified)), ("content-security-policy", PAGE_CSP)]
        if fresh(headers, etag, modified):
            return Response(304, common)
        return Response(200, [*common, ("content-type", content_type)], body)
