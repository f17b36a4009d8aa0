"""The one scrubber for text a vendor sent (rule 19): every configured token and every secret learned during
the pull is cut out before the text reaches a message, a log, metadata or an alert.

``scrub(text)`` replaces each configured token (the value of every ``*token*`` variable of the two sources,
``SAAS_API_TOKEN``, ``BACKUP_RESELLER_TOKEN`` and ``BACKUP_ADMIN_TOKEN`` today) with ``[VARIABLE]``, and each
secret given to ``remember_secret`` (source B's owner tokens, learned as the pull goes) with ``[owner token]``
or the label it was remembered with. Short tokens are scrubbed too: a one-letter token costs readability,
never a leak.

Besides the token as it is (and stripped of surrounding blanks), the forms a vendor page plausibly echoes
are removed: URL-encoded (``quote``, ``quote_plus``, hex digits in either case), JSON-string-escaped, and
base64 (standard or URL-safe, as in an echoed ``Authorization: Basic`` header): there the whole base64 word
holding the token's encoding at any of the three byte alignments is replaced (for tokens of 5 bytes or more;
a shorter one has no encoding of its own at every alignment). Other encodings (hex, HTML
entities, a token split across lines) are not attempted; our own clients never send a token in them.

Scrubbing is one pass over the text with the forms actually present, longest first, so a token that
contains another is replaced whole and a label is never scrubbed again.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import threading
from urllib.parse import quote, quote_plus

from m365_pipeline.settings import env_value

OWNER_TOKEN = "owner token"
_B64_CHARS = "[A-Za-z0-9+/_-]*"  # both alphabets: the rest of a base64 word around the token's encoding

_lock = threading.Lock()
_remembered: dict[str, str] = {}  # secret -> label


@functools.cache
def token_variables() -> tuple[str, ...]:
    """The variables that hold a configured token: each source's ``env_fields`` whose field names a token.
    Imported on first use: the vendor clients import this module."""
    from m365_pipeline.resources import BackupApiResource, SaasApiResource

    return tuple(name for resource in (SaasApiResource, BackupApiResource)
                 for field, name in resource.env_fields.items() if "token" in field)


def remember_secret(value: str, label: str = OWNER_TOKEN) -> None:
    """Scrub ``value`` from every later ``scrub`` in this process, as ``[label]`` (a blank value is ignored)."""
    if value and value.strip():
        with _lock:
            _remembered.setdefault(value, label)


def scrub(text: str) -> str:
    """``text`` without any configured token or remembered secret, in any of the forms the module names."""
    with _lock:
        remembered = list(_remembered.items())
    secrets = [(value, name) for name in token_variables() if (value := env_value(name))] + remembered
    lowered = None
    present: dict[str, tuple[str, str]] = {}  # form -> (kind, label); the first label wins
    for value, label in secrets:
        for form, kind in _forms(value):
            if form in present:
                continue
            if kind == _PERCENT:
                lowered = text.lower() if lowered is None else lowered
                found = form.lower() in lowered
            else:
                found = form in text
            if found:
                present[form] = (kind, label)
    if not present:
        return text
    ordered = sorted(present.items(), key=lambda item: -len(item[0]))
    pattern = "|".join(f"({_PATTERNS[kind](form)})" for form, (kind, _) in ordered)
    labels = [f"[{label}]" for _, (_, label) in ordered]
    return re.sub(pattern, lambda match: labels[match.lastindex - 1], text)  # type: ignore[operator]


_LITERAL, _PERCENT, _BASE64 = "literal", "percent", "base64"
_PATTERNS = {
    _LITERAL: re.escape,
    _PERCENT: lambda form: re.sub("%([0-9A-F]{2})", r"%(?i:\1)", re.escape(form)),
    _BASE64: lambda form: f"{_B64_CHARS}{re.escape(form)}{_B64_CHARS}=*",
}


@functools.lru_cache(maxsize=65536)
def _forms(value: str) -> tuple[tuple[str, str], ...]:
    """The strings to look for, each with its kind: literal, URL-encoded (hex in either case), or the
    alignment-independent core of a base64 encoding (the base64 word around it goes too)."""
    literal: list[str] = []
    for raw in dict.fromkeys((value, value.strip())):
        literal += [raw, json.dumps(raw)[1:-1], json.dumps(raw, ensure_ascii=False)[1:-1]]
        literal += [quoted for quoted in (quote(raw, safe=""), quote_plus(raw, safe="")) if quoted != raw]
    cores: list[str] = []
    data = value.strip().encode()
    for offset in range(3):
        # Encoded after ``offset`` other bytes, the first group mixes them in and a partial last group mixes in
        # what follows; the groups between depend on the token alone.
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        core = encoded[4 if offset else 0: len(encoded) - (4 if (offset + len(data)) % 3 else 0)]
        if core:
            cores += [core, core.replace("+", "-").replace("/", "_")]
    forms = [(form, _PERCENT if "%" in form and form not in (value, value.strip()) else _LITERAL)
             for form in dict.fromkeys(literal) if form]
    return tuple(forms + [(core, _BASE64) for core in dict.fromkeys(cores)])
