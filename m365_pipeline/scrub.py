"""Rule 19's scrubber: every text a vendor sends back passes through ``scrub`` before a message, log,
metadata or alert carries it.

It removes every configured token (the variables the vendor resources read their tokens from) and every
secret ``remember_secret`` was given during the run (source B's owner tokens, learned from the vendor).
Minimal version made by the client branch; the lead reconciles it with the scrubbing helper's module.
"""

from __future__ import annotations

import threading
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
_MIN_SECRET = 4  # shorter values would scrub ordinary words; no token is that short

_remembered: set[str] = set()
_lock = threading.Lock()  # remembered from pull steps and read from alert code, possibly in other threads


def remember_secret(value: str) -> None:
    """Scrub ``value`` (and its URL-encoded spellings) from every text from now on, process-wide."""
    value = value.strip()
    if len(value) >= _MIN_SECRET:
        with _lock:
            _remembered.update({value, quote(value, safe=""), quote_plus(value)})


def _configured() -> set[str]:
    import os

    from m365_pipeline.resources import BackupApiResource, SaasApiResource  # late: resources use this module

    variables = {variable for resource in (SaasApiResource, BackupApiResource)
                 for field, variable in resource.env_fields.items() if "token" in field}
    values = {os.environ.get(variable, "").strip() for variable in variables}
    return {spelling for value in values if len(value) >= _MIN_SECRET
            for spelling in (value, quote(value, safe=""), quote_plus(value))}


def scrub(text: str) -> str:
    """``text`` with every configured and remembered token replaced by ``[redacted]``."""
    with _lock:
        secrets = _remembered | _configured()
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one token may contain another
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
