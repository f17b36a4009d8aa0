"""Bodies of ``/api/m365/history`` and ``/api/m365/changes`` (docs/RULES.md, rules 11 and 12), the
choice of night A, and the changes database. Shared by the export step (which writes the history
files and the changed users' history, ``CHANGED_USERS_FILE``) and ``m365-serve`` (which answers
``/changes`` at request time from that file with the stored rule-12 SQL, ``CHANGES_SQL``)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from m365_pipeline.publishing import json_bytes

HISTORY_FIELDS = ("date", "es_user_count", "m365_licensed_user_count")
CHANGE_FIELDS = (
    "organization_name", "previous_organization_name", "user_principal_name", "display_name", "change",
    "licenses_before", "licenses_after", "has_email_license_before", "has_email_license_after",
)
CHANGE_KINDS = ("added", "removed", "moved", "email_gained", "email_lost", "licenses_changed")
# The stored macros of rules 11 and 12 (marts.published_users_on, marts.changes_between).
CHANGES_SQL = "marts_changes.sql"
# In each published version: the marts.published_users_history rows of every user whose rows changed
# on a kept night (see nights.write_changed_users), all m365-serve needs to answer /changes.
CHANGED_USERS_FILE = "history/changed_users.parquet"
# In each published version: every organization's /history body (JSON), one after the other; the
# manifest's history_organizations maps each exact name to its [offset, length] in this file.
ORGANIZATION_HISTORY_FILE = "history/organizations.json"
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


def changes_database(changed_users: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding a version's ``CHANGED_USERS_FILE`` as marts.published_users_history,
    with the stored macros of ``CHANGES_SQL``; it reads no other file afterwards."""
    # Small: one per version in each m365-serve worker, answering one selection at a time per request.
    conn = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "1GB"})
    conn.execute("CREATE SCHEMA marts")
    conn.execute("CREATE TABLE marts.published_users_history AS SELECT * FROM read_parquet($1)", [str(changed_users)])
    conn.execute(resources.files("m365_pipeline").joinpath("sql", CHANGES_SQL).read_text(encoding="utf-8"))
    conn.execute("SET enable_external_access = false")
    conn.execute("SET lock_configuration = true")
    return conn


def changes_rows(conn: duckdb.DuckDBPyConnection, night_a: str, tonight: str, organization: str | None
                 ) -> list[dict[str, Any]]:
    """Rule 12's rows from night A to tonight; with ``organization``, those whose organization_name or
    previous_organization_name is exactly it."""
    cursor = conn.execute(f"""
        SELECT {', '.join(CHANGE_FIELDS)} FROM marts.changes_between($1::DATE, $2::DATE)
        WHERE $3::VARCHAR IS NULL OR organization_name = $3 OR previous_organization_name = $3
        ORDER BY lower(organization_name), organization_name, lower(user_principal_name), user_principal_name""",
                          [night_a, tonight, organization])
    return [dict(zip(CHANGE_FIELDS, row, strict=True)) for row in cursor.fetchall()]
