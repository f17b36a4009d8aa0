"""Who may read, and from which web origins (rule 17): CORS today; tokens join here."""

from __future__ import annotations

from typing import Any

from .http import ALLOWED_METHODS, BASE_HEADERS, Response

CORS_HEADERS = (
    ("access-control-allow-origin", "*"),
    ("access-control-expose-headers", "ETag, Last-Modified, Content-Disposition"),
)


def cors_headers(headers: Any) -> list[tuple[str, str]]:
    return list(CORS_HEADERS)


def preflight(headers: Any) -> Response:
    requested = headers.get("access-control-request-headers") or ""
    allowed = ", ".join(h.strip() for h in requested.split(",")
                        if h.strip() and all(c.isalnum() or c in "-_" for c in h.strip()))[:500]
    out = [*BASE_HEADERS, ("access-control-allow-methods", ALLOWED_METHODS), ("allow", ALLOWED_METHODS),
           ("access-control-max-age", "86400")]
    if allowed:
        out.append(("access-control-allow-headers", allowed))
    return Response(204, out)
