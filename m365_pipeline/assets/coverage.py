"""Backup coverage (docs/RULES.md, rule 13): which email users source B does not protect, and which
backup seats have no email license, per organization.

Two tables (one SQL statement each), WARN checks that name who (in one step), and the published files of
``GET /api/m365/coverage``, written into the same version as the rest of the API.
"""

from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset_check,
)
from dagster_duckdb import DuckDBResource

from m365_pipeline.api_bodies import (
    COVERAGE_ORG_FIELDS,
    COVERAGE_TOTALS,
    COVERAGE_USER_FIELDS,
    FORMATS,
    coverage_organization_body,
    coverage_organization_json,
    coverage_overview_body,
    coverage_totals,
    csv_header,
)
from m365_pipeline.assets.core import backup_accounts, users
from m365_pipeline.assets.marts import org_summary
from m365_pipeline.duckdb_helpers import (
    ensure_schema,
    markdown_preview,
    read_sql,
    rows_by_first_column,
    run_sql,
    table_metadata,
    table_result,
    table_schema,
)
from m365_pipeline.publishing import VersionWriter

PREVIEW_ROWS = 20
BACKUP_STATUSES = ("active", "excluded", "available", "none")

BACKUP_COVERAGE_SCHEMA = table_schema(
    ("organization_name", "VARCHAR", "The organization (rule 1) whose coverage row this is."),
    ("user_principal_name", "VARCHAR", "The user's key: trimmed, lower-cased UPN."),
    ("display_name", "VARCHAR", "Display name as published (rule 7)."),
    ("m365_licensed", "BOOLEAN", "Published in this organization (rule 7)."),
    ("has_email_license", "BOOLEAN", "Published in this organization with an email (ES) license."),
    ("backup_status", "VARCHAR", "active, excluded, available or none, from this organization's mailboxes."),
    ("backup_accounts", "INTEGER", "This organization's rule-2 accounts with this key (0: not in the backup)."),
    ("unknown_status", "VARCHAR", "A status rule 13 does not know (counted as none); the least if several."),
    ("published_organization", "VARCHAR", "The user's organization by rule 3 (null: unassigned); may differ."),
)
ORG_BACKUP_COVERAGE_SCHEMA = table_schema(
    ("organization_name", "VARCHAR", "Organization exactly as source B names it."),
    ("es_user_count", "BIGINT", "Published users with an email license (as in marts.org_summary)."),
    ("es_users_backed_up", "BIGINT", "Of those, backup_status active."),
    ("es_users_not_backed_up", "BIGINT", "Of those, any other backup status: a data-loss risk."),
    ("backed_up_without_email_license", "BIGINT", "Active mailboxes without an email license: unbilled seats."),
)


@asset(
    key=["core", "backup_coverage"], group_name="core", kinds={"duckdb"},
    deps=[users, backup_accounts],
    metadata=table_metadata("core.backup_coverage", BACKUP_COVERAGE_SCHEMA),
)
def backup_coverage(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one user of one organization for backup coverage (rule 13).

    The organization's published users and every key of its mailboxes, once each: whether the
    user is published (and an email user) there, and its backup status there.
    """
    with duckdb.get_connection() as conn:
        run_sql(conn, "core_backup_coverage.sql")
        counts = dict(conn.execute(
            "SELECT backup_status, count(*) FROM core.backup_coverage GROUP BY 1").fetchall())
        return table_result(
            conn, "core.backup_coverage",
            **{f"{status}_rows": int(counts.get(status, 0)) for status in BACKUP_STATUSES},
        )


@asset(
    key=["marts", "org_backup_coverage"], group_name="marts", kinds={"duckdb"},
    deps=[backup_coverage, org_summary],
    metadata=table_metadata("marts.org_backup_coverage", ORG_BACKUP_COVERAGE_SCHEMA),
)
def org_backup_coverage(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one organization of the summary with its backup coverage counts (rule 13)."""
    with duckdb.get_connection() as conn:
        ensure_schema(conn, "marts")
        run_sql(conn, "marts_org_backup_coverage.sql")
        totals = conn.execute(f"""
            SELECT {', '.join(f'coalesce(sum({f}), 0)' for f in COVERAGE_ORG_FIELDS[1:])}
            FROM marts.org_backup_coverage""").fetchone()
        return table_result(
            conn, "marts.org_backup_coverage",
            preview_sql="SELECT * FROM marts.org_backup_coverage ORDER BY es_users_not_backed_up DESC, "
                        "backed_up_without_email_license DESC LIMIT 20",
            **{name: int(value) for name, value in zip(COVERAGE_TOTALS, totals, strict=True)},
        )


# -- checks: a human should look at these (WARN) -------------------------------------------------

GAPS = {
    "email_users_not_backed_up": "has_email_license AND backup_status <> 'active'",
    "backed_up_without_email_license": "NOT has_email_license AND backup_status = 'active'",
}


def gap_result(conn: Any, gap: str, sentence: str) -> AssetCheckResult:
    """A WARN result for one rule-13 gap: how many per organization, and a preview of who."""
    where = GAPS[gap]
    total = conn.execute(f"SELECT count(*) FROM core.backup_coverage WHERE {where}").fetchone()[0]
    per_org = markdown_preview(conn, f"""
        SELECT organization_name, count(*) AS users FROM core.backup_coverage WHERE {where}
        GROUP BY organization_name ORDER BY users DESC, lower(organization_name), organization_name
        LIMIT {PREVIEW_ROWS}""")
    who = markdown_preview(conn, f"""
        SELECT organization_name, user_principal_name, display_name, backup_status, m365_licensed
        FROM core.backup_coverage WHERE {where}
        ORDER BY lower(organization_name), organization_name, user_principal_name LIMIT {PREVIEW_ROWS}""")
    return AssetCheckResult(
        check_name=gap, asset_key=backup_coverage.key, passed=total == 0, severity=AssetCheckSeverity.WARN,
        description=None if total == 0 else f"{total} {sentence}",
        metadata={gap: total, "per_organization": MetadataValue.md(per_org), "who": MetadataValue.md(who)},
    )


def unknown_statuses_result(conn: Any) -> AssetCheckResult:
    total = conn.execute("SELECT count(*) FROM core.backup_coverage WHERE unknown_status IS NOT NULL").fetchone()[0]
    values = markdown_preview(conn, """
        SELECT unknown_status AS status, count(*) AS users FROM core.backup_coverage
        WHERE unknown_status IS NOT NULL GROUP BY 1 ORDER BY users DESC, status LIMIT 20""")
    return AssetCheckResult(
        check_name="unknown_backup_statuses", asset_key=backup_coverage.key,
        passed=total == 0, severity=AssetCheckSeverity.WARN,
        description=None if total == 0 else (
            f"{total} users have a backup status other than active, excluded or available; "
            "rule 13 counts them as none."),
        metadata={"users": total, "statuses": MetadataValue.md(values)},
    )


# Three checks in one step: each separate step costs Dagster more than its queries do. Its name starts
# with the asset's key, as a single check's step does (the bench sorts steps into phases by it).
@multi_asset_check(name="core__backup_coverage_checks", specs=[
    AssetCheckSpec("email_users_not_backed_up", asset=backup_coverage,
                   description="Email users the backup does not protect (status not active), per organization."),
    AssetCheckSpec("backed_up_without_email_license", asset=backup_coverage,
                   description="Backed-up mailboxes without an email license (seats that may not be billed)."),
    AssetCheckSpec("unknown_backup_statuses", asset=backup_coverage,
                   description="Backup status values rule 13 does not know (counted as none)."),
])
def backup_coverage_checks(context: AssetCheckExecutionContext, duckdb: DuckDBResource
                           ) -> Iterator[AssetCheckResult]:
    with duckdb.get_connection() as conn:
        yield gap_result(conn, "email_users_not_backed_up",
                         "email users are not backed up (no mailbox in the backup, or not active): "
                         "a data-loss risk.")
        yield gap_result(conn, "backed_up_without_email_license",
                         "mailboxes are backed up without an email license: shared mailboxes, leavers, "
                         "removed licenses; backup seats the customer may not be billed for.")
        yield unknown_statuses_result(conn)


# -- published files of GET /api/m365/coverage ---------------------------------------------------

def write_coverage_files(conn: Any, writer: VersionWriter, last_collected: str | None) -> dict[str, int]:
    """The overview (JSON, CSV) and one JSON and one CSV file per organization; returns the totals."""
    organizations = conn.execute(f"""
        SELECT {', '.join(COVERAGE_ORG_FIELDS)} FROM marts.org_backup_coverage
        ORDER BY lower(organization_name), organization_name""").fetchall()
    for fmt in FORMATS:
        writer.write_coverage(None, fmt, coverage_overview_body(organizations, last_collected, fmt))
    missing = {row[0] for row in organizations}
    with_control = []
    conn.execute(read_sql("macros.sql"))  # csv_cell
    for name, rows in rows_by_first_column(conn.execute(ROW_TEXT_SQL)):
        if name not in missing:  # a mailbox of an organization the summary lacks cannot happen
            raise RuntimeError("coverage rows of an organization missing from the summary")
        missing.discard(name)
        if any(control for _, _, control in rows):
            with_control.append(name)  # written below, once this query's rows are all read
        else:
            _write_organization_text(writer, name, rows)
    for name in with_control:
        _write_organization(writer, name, conn.execute(ORGANIZATION_ROWS_SQL, [name]).fetchall())
    for name in missing:
        _write_organization(writer, name, [])
    return coverage_totals(organizations)


# Each coverage row's JSON object and CSV record, written by DuckDB in rule 9's order, so Python only
# joins them: JSON and CSV byte for byte as api_bodies' json_bytes and csv_bytes write them, except that DuckDB
# escapes control characters as \u001F where Python writes \u001f. An organization with any (flagged
# here) is written from its rows by the reference encoders instead.
ROW_TEXT_SQL = f"""
    SELECT organization_name,
           to_json({{{', '.join(f"'{field}': {field}" for field in COVERAGE_USER_FIELDS)}}})::VARCHAR,
           {" || ',' || ".join(f"csv_cell({field})" for field in COVERAGE_USER_FIELDS)} || chr(13) || chr(10),
           regexp_matches(concat(organization_name, user_principal_name, display_name), '[\\x00-\\x1f]')
    FROM core.backup_coverage
    ORDER BY organization_name, lower(user_principal_name), user_principal_name"""
ORGANIZATION_ROWS_SQL = f"""
    SELECT {', '.join(COVERAGE_USER_FIELDS)} FROM core.backup_coverage WHERE organization_name = $1
    ORDER BY lower(user_principal_name), user_principal_name"""


def _write_organization_text(writer: VersionWriter, name: str, rows: list[tuple[str, str, bool]]) -> None:
    """An organization's files from rows DuckDB formatted (its JSON objects, its CSV records)."""
    writer.write_coverage(name, "json", coverage_organization_json(name, [json_row for json_row, _, _ in rows]))
    writer.write_coverage(name, "csv", (csv_header(COVERAGE_USER_FIELDS) + "".join(record for _, record, _ in rows)
                                        ).encode("utf-8"))


def _write_organization(writer: VersionWriter, name: str, rows: list[tuple]) -> None:
    """An organization's files from its rows, by Python's encoders (names with control characters)."""
    for fmt in FORMATS:
        writer.write_coverage(name, fmt, coverage_organization_body(name, rows, fmt))


coverage_assets = [backup_coverage, org_backup_coverage]
coverage_checks = [backup_coverage_checks]
