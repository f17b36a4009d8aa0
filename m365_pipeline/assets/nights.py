"""Nights (docs/RULES.md, rule 11) and their changes (rule 12): recorded by the publish step.

Only published nights count, so the night is recorded inside ``export.dashboard_api``: in one
DuckDB transaction, rolled back when anything before the version is sealed fails, and committed
just before the version swap. A night recorded but not served (the swap failed, or the run was
killed in between) is forgotten, at once or by the next run, which compares the kept nights with
the served version's. A blocked run never reaches the publish step and leaves no night.
The history files and the changed users' history of the version are built from the tables inside
that transaction, so they include tonight; m365-serve answers /changes from the latter.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
from dagster import AssetKey, AssetSpec, Failure, TableColumn, TableSchema

from m365_pipeline.api_bodies import (
    CHANGED_USERS_FILE,
    CONTENT_TYPES,
    FORMATS,
    HISTORY_FIELDS,
    ORGANIZATION_HISTORY_FILE,
    history_body,
    history_file_name,
    history_key,
)
from m365_pipeline.assets.marts import HISTORY_SCHEMA
from m365_pipeline.duckdb_helpers import (
    LAST_COLLECTED_SQL,
    fetch_dicts,
    marts_table_exists,
    path_literal,
    rows_by_first_column,
    run_sql,
    table_metadata,
    table_schema,
)
from m365_pipeline.history_api import CHANGES_SQL
from m365_pipeline.publishing import VersionWriter, iso_z

GROUP = "marts"
NIGHTS_KEY = AssetKey(["marts", "nights"])
USERS_HISTORY_KEY = AssetKey(["marts", "published_users_history"])
SUMMARY_HISTORY_KEY = AssetKey(["marts", "org_summary_history"])
LICENSE_HISTORY_KEY = AssetKey(["marts", "org_license_history"])
# Recorded in this order: the users' valid_from/valid_to need no other table, nights comes last.
NIGHT_SQL = ("marts_org_summary_history.sql", "marts_published_users_history.sql", CHANGES_SQL, "marts_nights.sql",
             "marts_billing.sql")

NIGHTS_SCHEMA = table_schema(
    ("collection_date", "DATE", "UTC date of last_collected; at most one night per date."),
    ("last_collected", "TIMESTAMPTZ", "When the published run's vendor pulls started (UTC)."),
)
USERS_HISTORY_SCHEMA = TableSchema(columns=[
    TableColumn("organization_name", "VARCHAR", description="The user's organization (rule 3)."),
    TableColumn("user_principal_name", "VARCHAR", description="The key (rule 2)."),
    TableColumn("display_name", "VARCHAR", description="As published (rule 7)."),
    TableColumn("licenses", "VARCHAR", description="As published (rule 6)."),
    TableColumn("has_email_license", "BOOLEAN", description="As published (rule 6)."),
    TableColumn("valid_from", "DATE", description="First kept night on which this row was published."),
    TableColumn("valid_to", "DATE", description="First kept night on which it no longer was; null: still is."),
])
LICENSE_HISTORY_SCHEMA = table_schema(
    ("collection_date", "DATE", "The published night (rule 11)."),
    ("organization_name", "VARCHAR", "The organization (rule 3)."),
    ("license_name", "VARCHAR", "A license name as published (rule 6); rule 14 counts names equal ignoring case "
                                "as one license."),
    ("users", "BIGINT", "The night's published users holding it, spelled so (never 0)."),
    ("license_users", "BIGINT", "The night's published users holding the license in any spelling (rule 14)."),
    ("first_spelling", "BOOLEAN", "Whether license_name is the license's first spelling by rule 9 that night: "
                                  "one row per license and night is."),
)

NIGHT_SPECS = [
    AssetSpec(NIGHTS_KEY, group_name=GROUP, kinds={"duckdb"},
              description="One row = one published night (rule 11): its collection_date and last_collected. "
                          "Recorded by the publish step; a blocked or failed run adds none.",
              metadata=table_metadata("marts.nights", NIGHTS_SCHEMA)),
    AssetSpec(USERS_HISTORY_KEY, group_name=GROUP, kinds={"duckdb"},
              description="One row = one published user's rule-7 values over a span of kept nights "
                          "[valid_from, valid_to). marts.published_users_on(d) and marts.changes_between(a, b) "
                          "read it.",
              metadata=table_metadata("marts.published_users_history", USERS_HISTORY_SCHEMA)),
    AssetSpec(SUMMARY_HISTORY_KEY, group_name=GROUP, kinds={"duckdb"},
              description="One row = one organization on one published night. Re-running a day replaces that day.",
              metadata=table_metadata("marts.org_summary_history", HISTORY_SCHEMA)),
    AssetSpec(LICENSE_HISTORY_KEY, group_name=GROUP, kinds={"duckdb"},
              description="One row = one license name of one organization on one published night, with its "
                          "holders. Rule 14's license figures (marts.billing_licenses) add these up over a month's "
                          "days.",
              metadata=table_metadata("marts.org_license_history", LICENSE_HISTORY_SCHEMA)),
]


class NightOutOfOrder(Failure):
    """A clock set back before the latest kept night: the step's retries (minutes later) cannot help."""

    def __init__(self, message: str):
        super().__init__(description=message, allow_retries=False)


def record_night(conn: duckdb.DuckDBPyConnection, served: dict[str, Any] | None) -> tuple[str, str]:
    """Record tonight in the open transaction; returns (date, last_collected).

    last_collected is the summary's; a night with no organization (source B not configured) takes it
    from the raw tables, as rule 10 defines it. ``served`` is the manifest of the version served now:
    a kept night newer than its latest night was recorded by a run killed before its swap, and is
    forgotten, as is a night on tonight's date (a re-run replaces it).

    Nights are recorded in date order: a clock set back before the latest kept night is refused
    with a clear error rather than rewriting history.
    """
    conn.execute(f"""
        CREATE OR REPLACE TEMP VIEW tonight AS
        SELECT (t AT TIME ZONE 'UTC')::DATE AS collection_date, t AS last_collected
        FROM (SELECT coalesce((SELECT min(last_collected) FROM marts.org_summary), ({LAST_COLLECTED_SQL})) AS t)""")
    day, collected = conn.execute("SELECT collection_date, last_collected FROM tonight").fetchone()
    if day is None:
        raise RuntimeError("no raw table has a collected_at: nothing was collected tonight")
    if marts_table_exists(conn, "nights"):
        served_nights = (served or {}).get("nights") or []
        # Without a served version (its directory removed) no kept night is presumed unserved.
        served_latest = dt.date.fromisoformat(served_nights[-1]["date"]) if served_nights else None
        latest = conn.execute("SELECT max(collection_date) FROM marts.nights WHERE $1::DATE IS NULL "
                              "OR collection_date <= $1::DATE", [served_latest]).fetchone()[0]
        if latest is not None and day < latest:
            raise NightOutOfOrder(
                f"tonight's collection date {day} is before the latest kept night {latest}; "
                "check the clock of the machine running the pipeline. Nothing was published.")
        forget_nights(conn, min(day, served_latest + dt.timedelta(days=1)) if served_latest else day)
    for name in NIGHT_SQL:
        run_sql(conn, name)
    return day.isoformat(), iso_z(collected)


def forget_nights(conn: duckdb.DuckDBPyConnection, since: dt.date | str) -> None:
    """Forget every kept night dated ``since`` or later (see marts_nights_forget.sql), and its license counts
    (a database from before them has the nights but not yet the table: billing.record_license_counts)."""
    conn.execute("CREATE OR REPLACE TEMP TABLE forget_from AS SELECT $1::DATE AS d", [since])
    run_sql(conn, "marts_nights_forget.sql")
    if marts_table_exists(conn, "org_license_history"):
        conn.execute("DELETE FROM marts.org_license_history WHERE collection_date >= $1::DATE", [since])



def write_history_files(conn: duckdb.DuckDBPyConnection, writer: VersionWriter) -> dict[str, Any]:
    """history/all.json|csv (totals per night) and ORGANIZATION_HISTORY_FILE: every organization's /history
    body, one after the other (one file a night rather than one per organization), from which m365-serve
    answers /history?org (its CSV made from that body).

    Returns the manifest's entries: nights [{date, last_collected}], history_organizations {name:
    [offset, length] in that file} (every organization of a kept night), organization_history (its path).
    """
    nights = [{"date": d.isoformat(), "last_collected": iso_z(c)} for d, c in conn.execute(
        "SELECT collection_date, last_collected FROM marts.nights ORDER BY collection_date").fetchall()]
    totals = fetch_dicts(conn.execute("""
        SELECT strftime(n.collection_date, '%Y-%m-%d') AS date,
               coalesce(sum(h.es_user_count), 0)::BIGINT AS es_user_count,
               coalesce(sum(h.m365_licensed_user_count), 0)::BIGINT AS m365_licensed_user_count
        FROM marts.nights AS n LEFT JOIN marts.org_summary_history AS h USING (collection_date)
        GROUP BY n.collection_date ORDER BY n.collection_date"""))
    for fmt in FORMATS:
        writer.write_bytes(history_key(fmt), history_file_name(fmt), history_body(None, totals, fmt),
                           CONTENT_TYPES[fmt])
    cursor = conn.execute("""
        SELECT h.organization_name, strftime(h.collection_date, '%Y-%m-%d') AS date, h.es_user_count,
               h.m365_licensed_user_count
        FROM marts.org_summary_history AS h SEMI JOIN marts.nights USING (collection_date)
        ORDER BY h.organization_name, h.collection_date""")
    ranges: dict[str, list[int]] = {}
    path = writer.path / ORGANIZATION_HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for name, rows in rows_by_first_column(cursor):
            body = history_body(name, [dict(zip(HISTORY_FIELDS, values, strict=True)) for values in rows], "json")
            ranges[name] = [out.tell(), len(body)]
            out.write(body)
    return {"nights": nights, "history_organizations": ranges, "organization_history": ORGANIZATION_HISTORY_FILE}


def write_changed_users(conn: duckdb.DuckDBPyConnection, writer: VersionWriter) -> str:
    """The version's CHANGED_USERS_FILE: every history row of the users with a row opened after the
    first kept night or closed. Returns its path in the version (for the manifest).

    marts.changes_between(a, b) only reads the rows of UPNs with a row opened or closed in (a, b]; for
    kept nights a <= b every such UPN is in this file with all its rows, so the macro gives the same
    answer on it as on the whole table, and the file grows with the changes, not with the users.
    """
    _copy(conn, """
        SELECT * FROM marts.published_users_history WHERE user_principal_name IN (
            SELECT user_principal_name FROM marts.published_users_history
            WHERE valid_to IS NOT NULL OR valid_from > (SELECT min(collection_date) FROM marts.nights))""",
          writer.path / CHANGED_USERS_FILE)
    return CHANGED_USERS_FILE


def _copy(conn: duckdb.DuckDBPyConnection, select: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn.execute(f"COPY ({select}) TO {path_literal(path)} (FORMAT parquet)")
