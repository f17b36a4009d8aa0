"""Who may read, and from which web origins (rule 17).

With a tokens file every request but a CORS preflight needs a token: ``Authorization: Bearer <token>``,
or HTTP Basic with the token as the password (any user name), so that a browser's own prompt serves the
page and its downloads. The file holds, one a line, a name and the SHA-256 of a token (``NAME SHA256HEX``;
``#`` starts a comment), never a token: ``m365-serve token add`` writes it. Without a tokens file CORS is
``*``; with one, only the origins given with ``--cors-origin`` are answered with CORS headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .http import ALLOWED_METHODS, BASE_HEADERS, HttpError, Response

TOKENS_FILE_VARIABLE = "M365_SERVE_TOKENS_FILE"
CORS_ORIGINS_VARIABLE = "M365_SERVE_CORS_ORIGINS"  # set by m365-serve for its workers: one origin a line
CHALLENGE = ("www-authenticate", 'Basic realm="m365-pipeline", charset="UTF-8"')
EXPOSED = ("access-control-expose-headers", "ETag, Last-Modified, Content-Disposition")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
DIGEST = re.compile(r"[0-9a-f]{64}")
RELOAD_INTERVAL_S = 1.0  # a token added (or removed) is in force within a second, without a restart
LOG = logging.getLogger("m365_serve.access")


class TokensFileError(ValueError):
    """A tokens file that cannot be used; the message names the file and the line, never a line's text."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_tokens(text: str, path: Path) -> dict[str, str]:
    """``{sha256 hex: name}`` from a tokens file's text."""
    digests: dict[str, str] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not DIGEST.fullmatch(fields[1].lower()):
            # Never quote the line: it may be a token pasted where its digest belongs.
            raise TokensFileError(
                f"line {number} of the tokens file {path} is not `NAME SHA256HEX` (a name and the 64 hex digits of "
                "a token's SHA-256); it may hold a token itself, which this file must never do: remove the line "
                "and add tokens with `m365-serve token add NAME --tokens-file PATH`")
        name, hexdigest = fields[0], fields[1].lower()
        if not NAME.fullmatch(name):
            raise TokensFileError(f"line {number} of the tokens file {path}: the name must be letters, digits "
                                  "and . _ @ - (at most 64)")
        if name in names or hexdigest in digests:
            raise TokensFileError(f"line {number} of the tokens file {path} repeats a name or a token")
        names.add(name)
        digests[hexdigest] = name
    return digests


def read_tokens(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokensFileError(f"the tokens file {path} does not exist; create it with "
                              f"`m365-serve token add NAME --tokens-file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"cannot read the tokens file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_tokens(text, path)


def add_token(path: Path, name: str) -> str:
    """A new random token for ``name``: its digest appended to ``path`` (created 0600), the token returned."""
    if not NAME.fullmatch(name):
        raise TokensFileError("NAME must be letters, digits and . _ @ - (at most 64), e.g. billing-laptop")
    existing = read_tokens(path) if path.exists() else {}
    if name in existing.values():
        raise TokensFileError(f"the tokens file {path} already has a token named {name}; pick another name")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(f"{name} {digest(token)}\n")
    return token


def presented_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` or the password of ``Basic``; None when neither."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, colon, password = decoded.partition(":")
        return password if colon and password else None
    return None


@dataclass
class Access:
    """Tokens (``None``: anyone who reaches the port may read) and the allowed CORS origins."""

    tokens_path: Path | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._digests: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.tokens_path is not None:
            self._digests = read_tokens(self.tokens_path)
            self._stamp = self._file_stamp()
            self._checked = time.monotonic()

    @classmethod
    def from_environment(cls) -> Access:
        path = os.environ.get(TOKENS_FILE_VARIABLE) or None
        origins = tuple(o for o in os.environ.get(CORS_ORIGINS_VARIABLE, "").splitlines() if o)
        return cls(Path(path) if path else None, origins)

    @property
    def tokens_on(self) -> bool:
        return self.tokens_path is not None

    def check(self, headers: Any) -> None:
        """Raises the 401 unless the request carries a known token (or no tokens file is in use)."""
        if self.tokens_path is None:
            return
        self._reload()
        token = presented_token(headers.get("authorization"))
        if token is None:
            raise HttpError(401, "a token is needed: send `Authorization: Bearer <token>`, or the token as the "
                                 "password of HTTP Basic", [CHALLENGE])
        presented = digest(token)
        if not any([hmac.compare_digest(presented, known) for known in self._digests]):  # every one, in constant time
            raise HttpError(401, "the token is not valid", [CHALLENGE])

    def cors_key(self, headers: Any) -> str | None:
        """What ``cors_headers`` depends on: nothing without tokens, else the origin if it is allowed."""
        if self.tokens_path is None:
            return None
        origin = headers.get("origin")
        return origin if origin in self.cors_origins else ""

    def cors_headers(self, headers: Any) -> list[tuple[str, str]]:
        if self.tokens_path is None:
            return [("access-control-allow-origin", "*"), EXPOSED]
        origin = headers.get("origin")
        if origin is not None and origin in self.cors_origins:
            return [("access-control-allow-origin", origin), EXPOSED, ("vary", "Origin")]
        return [("vary", "Origin")]

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            info = self.tokens_path.stat()  # type: ignore[union-attr]
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._digests = read_tokens(self.tokens_path)  # type: ignore[arg-type]
            except TokensFileError as exc:  # the tokens in force stay until the file is fixed
                LOG.error("m365-serve: %s; the tokens read before stay in force", exc)
            self._stamp = stamp


def preflight(headers: Any) -> Response:
    requested = headers.get("access-control-request-headers") or ""
    allowed = ", ".join(h.strip() for h in requested.split(",")
                        if h.strip() and all(c.isalnum() or c in "-_" for c in h.strip()))[:500]
    out = [*BASE_HEADERS, ("access-control-allow-methods", ALLOWED_METHODS), ("allow", ALLOWED_METHODS),
           ("access-control-max-age", "86400")]
    if allowed:
        out.append(("access-control-allow-headers", allowed))
    return Response(204, out)
