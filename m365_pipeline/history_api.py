"""``/api/m365/changes``' request-time logic (docs/RULES.md, rules 11 and 12): the choice of night A
and the changes database. The export step writes the changed users' history
(``api_bodies.CHANGED_USERS_FILE``); ``m365-serve`` answers ``/changes`` from that file with the stored
rule-12 SQL (``CHANGES_SQL``), its bodies made by ``api_bodies.changes_body``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from m365_pipeline.api_bodies import CHANGE_FIELDS

# The stored macros of rules 11 and 12 (marts.published_users_on, marts.changes_between).
CHANGES_SQL = "marts_changes.sql"
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
