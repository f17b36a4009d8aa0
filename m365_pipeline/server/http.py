"""HTTP semantics, apart from any route: the response, the error shape, content negotiation,
conditional requests and query parsing (RFC 9110)."""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from m365_pipeline.publishing import GZIP_MIN_BYTES
from m365_pipeline.publishing import etag as strong_etag

MAX_QUERY_LENGTH = 8192
MAX_QUERY_FIELDS = 16
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
# Headers on every answer; CORS headers are added by server/access.py.
BASE_HEADERS = (("x-content-type-options", "nosniff"),)


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


@functools.lru_cache(maxsize=256)  # browsers send a handful of distinct values; parsed once each
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


def fresh(headers: Any, etag: str, last_modified: datetime) -> bool:
    """The client's copy is current (RFC 9110 13.2.2: If-None-Match wins over If-Modified-Since)."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    since = headers.get("if-modified-since")
    return since is not None and not_modified_since(since, last_modified)


def gzip_etag(etag: str) -> str:
    """Another representation, so another strong validator (RFC 9110 8.8.3)."""
    return etag[:-1] + '-gzip"'


@dataclass(frozen=True)
class Representation:
    """A body made at request time, with its gzip twin (when worth it) and its strong ETag."""

    body: bytes
    gz: bytes | None
    etag: str

    @property
    def size(self) -> int:
        return len(self.body) + len(self.gz or b"")


def represent(body: bytes) -> Representation:
    """The one place a request-time body gets its gzip twin and ETag (published files get theirs when written)."""
    gz = gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
    return Representation(body, gz, strong_etag(body))


def parse_query(query_string: str) -> dict[str, str]:
    """Form-style decoding (%XX and + for space); each parameter at most once."""
    if not query_string:
        return {}
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
