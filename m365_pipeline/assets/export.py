"""Export layer: every response the M365 Usage Dashboard API can give, written as files.

The files form one published version (see ``m365_pipeline/publishing.py``): built in a
private directory and made current in one atomic step, so ``m365-serve`` answers from the
last good version until a complete new one exists.
"""

import os
import time
from datetime import timedelta
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    FreshnessPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)
from dagster_duckdb import DuckDBResource

from m365_pipeline.api_bodies import (
    CONTENT_TYPES,
    EXPORT_FIELDS,
    FORMATS,
    SORT_FIELDS,
    USER_FIELDS,
    export_file_name,
    export_json_envelope,
    export_key,
    summary_body,
    summary_file_name,
    summary_key,
    summary_totals,
    users_body,
)
from m365_pipeline.assets.billing import SEALED_PREVIEW, SEALED_SPEC, announce_sealed_months, seal_and_write
from m365_pipeline.assets.core import users
from m365_pipeline.assets.coverage import org_backup_coverage, write_coverage_files
from m365_pipeline.assets.marts import org_summary
from m365_pipeline.assets.nights import (
    NIGHT_SPECS,
    NightOutOfOrder,
    forget_nights,
    record_night,
    write_changed_users,
    write_history_files,
)
from m365_pipeline.crashpoints import crash_point
from m365_pipeline.duckdb_helpers import markdown_table, path_literal, read_sql, rows_by_first_column, table_result
from m365_pipeline.processes import process_alive
from m365_pipeline.publishing import VersionWriter, export_dir, iso_z, published_manifest
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.resources.base import configured_sources
from m365_pipeline.run_retries import do_not_retry_this_run
from m365_pipeline.settings import ANALYTICS_FILE

GROUP = "export"
ANALYTICS_STORAGE = "v1.2.0"
# Published data turns red in the UI when the nightly 23:00 run has not succeeded for over a day.
NIGHTLY_FRESHNESS = FreshnessPolicy.time_window(fail_window=timedelta(hours=25), warn_window=timedelta(hours=24))
# Contract rule 9: "case-insensitively" = lower-cased string, then the string itself.
EXPORT_ORDER = {
    "organization_name": "lower(organization_name), organization_name, user_principal_name",
    "user_principal_name": "lower(user_principal_name), user_principal_name, lower(organization_name), "
                           "organization_name",
    "display_name": "lower(display_name), display_name, lower(organization_name), organization_name, "
                    "user_principal_name",
}
SUMMARY_SQL = """
    SELECT organization_name, es_user_count, m365_licensed_user_count, last_collected
    FROM marts.org_summary ORDER BY lower(organization_name), organization_name
"""


@multi_asset(specs=[
    AssetSpec(
        ["export", "dashboard_api"], group_name=GROUP, kinds={"json", "csv"},
        deps=[org_summary, users, org_backup_coverage],
        freshness_policy=NIGHTLY_FRESHNESS,
        description=(
            "One file = one response of the M365 Usage Dashboard API (summary, users per organization, "
            "export in JSON and CSV for each sort, history and changes, backup coverage when source B is "
            "configured), published atomically under "
            "<data dir>/export/current."
        ),
    ),
    # Only published nights count (rule 11): the night is recorded by the publish step itself.
    *[spec.replace_attributes(deps=[org_summary, users]) for spec in (*NIGHT_SPECS, SEALED_SPEC)],
])
def dashboard_api(context: AssetExecutionContext, duckdb: DuckDBResource, saas: SaasApiResource,
                  backup: BackupApiResource):
    root = export_dir(Path(duckdb.database).parent)
    writer = VersionWriter(root)
    with duckdb.get_connection() as conn:
        conn.begin()  # tonight's night is recorded in one transaction, committed just before the swap
        recorded = False
        try:
            started = time.perf_counter()
            organizations = conn.execute(SUMMARY_SQL).fetchall()
            query_time_ms = int((time.perf_counter() - started) * 1000)
            stamps = [row[3] for row in organizations if row[3] is not None]
            last_collected = iso_z(min(stamps)) if stamps else None
            totals = _write_summary(writer, organizations, last_collected, query_time_ms)
            published_users = _write_users_files(conn, writer, [row[0] for row in organizations])
            crash_point("publish")
            conn.execute(read_sql("macros.sql"))  # csv_neutralise (rule 16)
            for sort in SORT_FIELDS:
                _write_exports(conn, writer, sort, published_users, last_collected)
            coverage = _write_coverage(conn, writer, backup, last_collected)
            night, _ = record_night(conn, published_manifest(root))
            history = write_history_files(conn, writer)
            changed_users = write_changed_users(conn, writer)
            billing, sealed_now = seal_and_write(conn, writer, night)
            # The sources tonight's numbers came from: the next night must not silently lose one.
            writer.seal({"last_collected": last_collected, "totals": totals, **history, "changed_users": changed_users,
                         "sources": configured_sources(saas, backup), **billing})
            conn.commit()
            recorded = True  # the night counts once the swap makes it current; a kill in between is undone next run
            writer.swap()
        except BaseException as exc:
            if isinstance(exc, NightOutOfOrder):
                do_not_retry_this_run(context)  # a clock set back fails the same way when the run is retried
            if recorded and not writer.is_current():
                conn.begin()  # recorded but never served; the next run would forget it too
                forget_nights(conn, night)
                conn.commit()
            elif not recorded:
                conn.rollback()
            conn.close()  # dagster_duckdb closes only on success; a failed run must not hold the file
            writer.abandon()
            raise
        announced = announce_sealed_months(conn, context.log, context.run_id, context.job_name)
        night_results = _night_results(conn, night)
    context.log.info(f"published version {writer.version_id} to {root / 'current'}")
    size = sum((writer.path / entry["path"]).stat().st_size for entry in writer.files.values())
    yield MaterializeResult(asset_key=["export", "dashboard_api"], metadata={
        "dagster/row_count": published_users,
        "version": writer.version_id,
        "path": MetadataValue.path(str(writer.path)),
        "files": len(writer.files),
        "bytes": size,
        "last_collected": last_collected or "never",
        "query_time_ms": query_time_ms,
        "nights_kept": len(history["nights"]),
        "billing_months": len(billing["billing"]),
        "billing_months_sealed_now": ", ".join(sealed_now) or "none",
        "billing_months_announced": announced,
        **totals,
        **coverage,
        "preview": MetadataValue.md(_preview(organizations)),
    })
    yield from night_results


NIGHT_PREVIEWS = (  # in the order of NIGHT_SPECS
    "SELECT * FROM marts.nights ORDER BY 1 DESC LIMIT 14",
    """SELECT valid_from AS night, count(*) AS rows_opened FROM marts.published_users_history
       GROUP BY 1 ORDER BY 1 DESC LIMIT 14""",
    """SELECT collection_date, count(*) AS organizations, sum(es_user_count) AS es_users,
              sum(m365_licensed_user_count) AS m365_licensed_users
       FROM marts.org_summary_history GROUP BY 1 ORDER BY 1 DESC LIMIT 14""",
    """SELECT collection_date, count(DISTINCT lower(license_name)) AS licenses, sum(users) AS license_holders
       FROM marts.org_license_history GROUP BY 1 ORDER BY 1 DESC LIMIT 14""",
)


def _night_results(conn, night: str) -> list[MaterializeResult]:
    nights = conn.execute("SELECT count(*) FROM marts.nights").fetchone()[0]
    return [
        MaterializeResult(asset_key=spec.key, metadata=table_result(
            conn, spec.metadata["dagster/table_name"], preview_sql=preview, collection_date=night,
            nights_kept=nights).metadata)
        for spec, preview in zip((*NIGHT_SPECS, SEALED_SPEC), (*NIGHT_PREVIEWS, SEALED_PREVIEW), strict=True)
    ]


def _write_summary(writer: VersionWriter, organizations: list[tuple], last_collected: str | None,
                   query_time_ms: int) -> dict[str, int]:
    for fmt in FORMATS:
        writer.write_bytes(summary_key(fmt), summary_file_name(fmt),
                           summary_body(organizations, last_collected, query_time_ms, fmt), CONTENT_TYPES[fmt])
    return summary_totals(organizations)


def _write_users_files(conn, writer: VersionWriter, organization_names: list[str]) -> int:
    """One file per organization (also for those without users); returns the published user count.

    Each organization's file is written as soon as its rows have arrived, so only one organization's
    users are in memory (the publish step's peak memory at 1M users is in bench/RESULTS.md).
    """
    cursor = conn.execute(f"""
        SELECT {', '.join(EXPORT_FIELDS)} FROM core.users WHERE published
        ORDER BY organization_name, user_principal_name""")
    summarised = set(organization_names)
    unknown: set[str] = set()
    total = 0

    def write(name: str, rows: list[dict]) -> None:
        if name not in summarised:
            unknown.add(name)
            return
        summarised.discard(name)
        writer.add_organization(name, users_body(name, rows))

    for organization, rows in rows_by_first_column(cursor):
        write(organization, [dict(zip(USER_FIELDS, fields, strict=True)) for fields in rows])
        total += len(rows)
    for name in organization_names:  # organizations without published users
        if name in summarised:
            write(name, [])
    if unknown:  # the blocking invariant check makes this unreachable; never publish it silently
        raise RuntimeError(f"published users of {len(unknown)} organizations missing from the summary")
    return total


def _write_exports(conn, writer: VersionWriter, sort: str, records: int, last_collected: str | None) -> None:
    """CSV and JSON straight from DuckDB's writers (RFC 4180 quoting and CRLF, JSON escaping).

    DuckDB's COPY rather than api_bodies.csv_bytes: 7x faster at 1M users (0.8 s against 5.5 s a sort),
    streamed; rule 16's cells by the SQL twin of api_bodies.neutralise (csv_neutralise, sql/macros.sql).
    """
    order = f"FROM core.users WHERE published ORDER BY {EXPORT_ORDER[sort]}"
    cells = ", ".join(f"csv_neutralise({field}) AS {field}" for field in EXPORT_FIELDS)
    csv_path = writer.adopt(export_key(sort, "csv"), export_file_name(sort, "csv"), CONTENT_TYPES["csv"])
    conn.execute(f"COPY (SELECT {cells} {order}) TO {path_literal(csv_path)} "
                 "(FORMAT csv, HEADER true, QUOTE '\"', ESCAPE '\"', NEW_LINE '\r\n')")  # RFC 4180 records
    select = f"SELECT {', '.join(EXPORT_FIELDS)} {order}"

    json_path = writer.adopt(export_key(sort, "json"), export_file_name(sort, "json"), CONTENT_TYPES["json"])
    array_path = json_path.with_suffix(".array")
    conn.execute(f"COPY ({select}) TO {path_literal(array_path)} (FORMAT json, ARRAY true)")
    before, after = export_json_envelope(records, last_collected)
    with json_path.open("wb") as out, array_path.open("rb") as array:
        out.write(before)
        while chunk := array.read(1 << 20):
            out.write(chunk)
        out.write(after)
    array_path.unlink()


def _write_coverage(conn, writer: VersionWriter, backup: BackupApiResource, last_collected: str | None
                    ) -> dict[str, object]:
    """GET /api/m365/coverage's files; none when source B is not configured (the API then says so)."""
    if not backup.is_configured:
        return {"coverage": "not published: source B is not configured"}
    return {f"coverage_{name}": value for name, value in write_coverage_files(conn, writer, last_collected).items()}


def _preview(organizations: list[tuple]) -> str:
    return markdown_table(("organization", "ES users", "M365 licensed"), [row[:3] for row in organizations[:15]])


@asset(
    key=["export", "analytics_db"], group_name=GROUP, kinds={"duckdb"},
    deps=[dashboard_api], freshness_policy=NIGHTLY_FRESHNESS,
    description=(
        "analytics.duckdb: the file analysts open (duckdb -readonly data/analytics.duckdb). Same schemas and "
        "tables as the pipeline's working file, replaced atomically after each successful run, so an open "
        "analyst session never blocks the night and always sees one consistent snapshot."
    ),
)
def analytics_db(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    source = Path(duckdb.database)
    target = source.with_name(ANALYTICS_FILE)
    remove_stale_copies(source.parent)
    temporary = source.with_name(f".{ANALYTICS_FILE}.{os.getpid()}.tmp")
    with duckdb.get_connection() as conn:
        source_name = conn.execute("SELECT current_database()").fetchone()[0]
        # An older storage format, so analysts' tools (the duckdb CLI, DBeaver's driver) that lag
        # behind our DuckDB can still open the file.
        conn.execute(f"ATTACH {path_literal(temporary)} AS analytics_copy (STORAGE_VERSION '{ANALYTICS_STORAGE}')")
        try:
            conn.execute(f'COPY FROM DATABASE "{source_name}" TO analytics_copy')
        finally:
            conn.execute("DETACH analytics_copy")
        tables = conn.execute("""
            SELECT table_schema || '.' || table_name FROM information_schema.tables
            WHERE table_catalog = current_database() ORDER BY 1""").fetchall()
    crash_point("analytics")
    os.replace(temporary, target)  # readers holding the old file keep their snapshot
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(target)),
        "bytes": target.stat().st_size,
        "tables": MetadataValue.md("\n".join(f"- `{name}`" for (name,) in tables)),
        "open_with": f"duckdb -readonly {target}",
    })


def remove_stale_copies(data_dir: Path) -> list[str]:
    """Delete half-written analytics copies (and their DuckDB WAL) whose writing process is gone.

    A copy whose writer is alive is another run's, still being written: it is left alone.
    """
    removed = []
    for stale in data_dir.glob(f".{ANALYTICS_FILE}.*.tmp*"):
        pid = stale.name[len(ANALYTICS_FILE) + 2:].split(".", 1)[0]
        if pid.isdigit() and process_alive(int(pid)) and int(pid) != os.getpid():
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


export_assets = [dashboard_api, analytics_db]
