"""Bodies of ``/api/m365/history`` and ``/api/m365/changes`` (docs/RULES.md, rules 11 and 12), and
the choice of night A. Plain Python shared by the export step (which writes them as files) and
``m365-serve`` (which selects one organization's changes at request time)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from m365_pipeline.publishing import json_bytes

HISTORY_FIELDS = ("date", "es_user_count", "m365_licensed_user_count")
CHANGE_FIELDS = (
    "organization_name", "previous_organization_name", "user_principal_name", "display_name", "change",
    "licenses_before", "licenses_after", "has_email_license_before", "has_email_license_after",
)
CHANGE_KINDS = ("added", "removed", "moved", "email_gained", "email_lost", "licenses_changed")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class BadDate(ValueError):
    pass


def parse_date(text: str) -> str:
    """A ``YYYY-MM-DD`` calendar date, returned as given; ``BadDate`` otherwise."""
    from datetime import date

    if not _DATE.fullmatch(text):
        raise BadDate(f"since must be a date written YYYY-MM-DD, not {text[:40]!r}")
    try:
        date.fromisoformat(text)
    except ValueError:
        raise BadDate(f"since is not a calendar date: {text[:40]!r}") from None
    return text


def night_a(dates: Sequence[str], since: str | None) -> str | None:
    """Night A of ``/changes`` among the kept ``dates`` (ascending, the last is tonight); None: none qualifies.

    With ``since``: the latest kept date on or before it. Without: the latest kept date before tonight.
    ISO dates compare correctly as strings.
    """
    candidates = [d for d in dates if d <= since] if since is not None else list(dates[:-1])
    return candidates[-1] if candidates else None


def file_key(name: str) -> str:
    """A fixed-length, filesystem-safe key of an exact organization name (never the name itself)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def csv_bytes(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    """RFC 4180 (the csv module's quoting, CRLF records): a header of ``fields``, then one line per row."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(fields)
    writer.writerows([_cell(row[name]) for name in fields] for row in rows)
    return out.getvalue().encode("utf-8")


def history_body(organization: str | None, rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "csv":
        return csv_bytes(HISTORY_FIELDS, rows)
    return json_bytes({"status": "success", "organization": organization, "history": rows})


def changes_body(from_collected: str, to_collected: str, rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "csv":
        return csv_bytes(CHANGE_FIELDS, rows)
    return json_bytes({"status": "success", "from": from_collected, "to": to_collected, "changes": rows,
                       "total_changes": len(rows)})


def select_organization(rows: Iterable[dict[str, Any]], organization: str) -> list[dict[str, Any]]:
    """The changes whose organization_name or previous_organization_name is exactly ``organization``."""
    return [row for row in rows
            if row["organization_name"] == organization or row["previous_organization_name"] == organization]
