"""Marts layer: the per-organization summary the dashboard shows (its nightly history is recorded
by the publish step, see ``nights.py``).

Three blocking checks guard the summary: the contract's invariants (rule 8), a
plausibility check that stops an outage masquerading as data (no organizations, or far
fewer than the last good night) from reaching the published layer, and a check that no
source the last published night came from has gone missing.
"""

from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    TableColumn,
    TableSchema,
    asset,
    asset_check,
)
from dagster_duckdb import DuckDBResource

from m365_pipeline.assets.core import users
from m365_pipeline.duckdb_helpers import (
    ensure_schema,
    last_collected,
    run_sql,
    table_metadata,
    table_result,
    table_schema,
)
from m365_pipeline.publishing import export_dir, published_manifest
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.resources.base import configured_sources
from m365_pipeline.resources.publish_policy import PublishPolicy
from m365_pipeline.run_retries import do_not_retry_this_run

GROUP = "marts"

SUMMARY_SCHEMA = table_schema(
    ("organization_name", "VARCHAR", "Organization exactly as source B names it."),
    ("es_user_count", "BIGINT", "Published users with an email (ES) license."),
    ("m365_licensed_user_count", "BIGINT", "Published users (any M365 license)."),
    ("last_collected", "TIMESTAMPTZ", "When this run's vendor pulls started (UTC)."),
)
HISTORY_SCHEMA = TableSchema(columns=[
    TableColumn("collection_date", "DATE", description="UTC date of last_collected; one set of rows per date."),
    *SUMMARY_SCHEMA.columns,
])


@asset(
    key=["marts", "org_summary"], group_name=GROUP, kinds={"duckdb"},
    deps=[users, AssetKey(["raw", "backup_organizations"])],
    metadata=table_metadata("marts.org_summary", SUMMARY_SCHEMA),
)
def org_summary(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one organization with its ES-user and M365-licensed-user counts.

    Every organization source B knows appears, also with zero users; last_collected is when
    the run's pulls started.
    """
    with duckdb.get_connection() as conn:
        ensure_schema(conn, "marts")
        collected = last_collected(conn)
        run_sql(conn, "marts_org_summary.sql", [collected])
        totals = conn.execute("""
            SELECT count(*), coalesce(sum(es_user_count), 0), coalesce(sum(m365_licensed_user_count), 0)
            FROM marts.org_summary""").fetchone()
        return table_result(
            conn, "marts.org_summary",
            preview_sql="SELECT * EXCLUDE (last_collected) FROM marts.org_summary LIMIT 20",
            total_organizations=totals[0], total_es_users=int(totals[1]),
            total_m365_licensed_users=int(totals[2]),
            last_collected=collected.isoformat() if collected else "never",
        )


def blocking_result(context: AssetCheckExecutionContext, *, passed: bool, **kwargs) -> AssetCheckResult:
    """A blocking check's verdict. A night held back fails the same way when retried, so it is not."""
    if not passed:
        do_not_retry_this_run(context)
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.ERROR, **kwargs)


INVARIANT_SQL = {
    "every organization of source B appears exactly once": """
        SELECT count(*) FROM (
            SELECT organization_name FROM (SELECT DISTINCT organization_name FROM raw.backup_organizations)
            FULL OUTER JOIN (SELECT organization_name, count(*) AS n FROM marts.org_summary GROUP BY 1)
            USING (organization_name)
            WHERE n IS DISTINCT FROM 1)""",
    "es_user_count never exceeds m365_licensed_user_count": """
        SELECT count(*) FROM marts.org_summary WHERE es_user_count > m365_licensed_user_count OR es_user_count < 0""",
    "each organization's counts equal its published users": """
        SELECT count(*) FROM marts.org_summary AS s
        LEFT JOIN (SELECT organization_name, count(*) AS m365, count(*) FILTER (WHERE has_email_license) AS es
                   FROM core.users WHERE published GROUP BY 1) AS u USING (organization_name)
        WHERE s.m365_licensed_user_count <> coalesce(u.m365, 0) OR s.es_user_count <> coalesce(u.es, 0)""",
    "every published user belongs to a summarised organization": """
        SELECT count(*) FROM core.users AS u
        WHERE u.published AND u.organization_name NOT IN (SELECT organization_name FROM marts.org_summary)""",
}


@asset_check(asset=org_summary, blocking=True,
             description="Contract rule 8: counts are consistent with the published users. Blocks publishing.")
def contract_invariants(context: AssetCheckExecutionContext, duckdb: DuckDBResource) -> AssetCheckResult:
    with duckdb.get_connection() as conn:
        broken = {name: conn.execute(sql).fetchone()[0] for name, sql in INVARIANT_SQL.items()}
    failed = {name: n for name, n in broken.items() if n}
    return blocking_result(
        context, passed=not failed,
        description=None if not failed else "Broken: " + "; ".join(f"{k} ({v} rows)" for k, v in failed.items()),
        metadata={name: n for name, n in broken.items()},
    )


@asset_check(asset=org_summary, blocking=True,
             description="Stops a broken pull (no organizations, or far fewer than the last good night) "
                         "from replacing good data.")
def pull_is_plausible(
    context: AssetCheckExecutionContext, duckdb: DuckDBResource, publish_policy: PublishPolicy
) -> AssetCheckResult:
    with duckdb.get_connection() as conn:
        orgs, licensed, collected = conn.execute("""
            SELECT count(*), coalesce(sum(m365_licensed_user_count), 0), min(last_collected)
            FROM marts.org_summary""").fetchone()
        previous = conn.execute("""
            SELECT count(*), coalesce(sum(m365_licensed_user_count), 0), max(last_collected)
            FROM marts.org_summary_history
            WHERE collection_date = (SELECT max(collection_date) FROM marts.org_summary_history
                                     WHERE last_collected < $1)""", [collected]).fetchone() \
            if _has_history(conn) and collected is not None else (0, 0, None)
    problems = verdict(orgs, licensed, previous[0], previous[1], publish_policy)
    return blocking_result(
        context, passed=not problems,
        description="; ".join(problems) + ". The previous data stays published." if problems else None,
        metadata={
            "organizations": orgs, "m365_licensed_users": int(licensed),
            "previous_organizations": previous[0], "previous_m365_licensed_users": int(previous[1]),
            "previous_collected": str(previous[2]) if previous[2] else "none",
            "max_drop_fraction": publish_policy.max_drop_fraction,
        },
    )


def verdict(orgs: int, licensed: int, prev_orgs: int, prev_licensed: int, policy: PublishPolicy) -> list[str]:
    """Why tonight's numbers look like an outage rather than data (empty list: they look fine)."""
    problems = []
    if orgs < policy.min_organizations:
        problems.append(f"only {orgs} organizations (at least {policy.min_organizations} expected)")
    floor = 1 - policy.max_drop_fraction
    if prev_orgs and orgs < prev_orgs * floor:
        problems.append(f"organizations fell from {prev_orgs} to {orgs}")
    if prev_licensed and licensed < prev_licensed * floor:
        problems.append(f"M365-licensed users fell from {prev_licensed} to {licensed}")
    return problems


@asset_check(asset=org_summary, blocking=True,
             description="Holds the night back when a source the last published night came from is not "
                         "configured tonight (unset, misspelled, or dropped by run config).")
def no_source_went_missing(
    context: AssetCheckExecutionContext, duckdb: DuckDBResource, saas: SaasApiResource,
    backup: BackupApiResource, publish_policy: PublishPolicy,
) -> AssetCheckResult:
    manifest = published_manifest(export_dir(Path(duckdb.database).parent)) or {}
    before, tonight = manifest.get("sources", []), configured_sources(saas, backup)
    missing = missing_sources(before, tonight)
    held = bool(missing) and not publish_policy.allow_missing_sources
    description = None
    if missing:
        description = (
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set tonight, but the last "
            f"published night (version {manifest.get('version')}) came from {', '.join(before)}. "
            + ("Set it in the service's environment (or .env) with its token. To publish without it on "
               "purpose, run with publish_policy allow_missing_sources: true. The previous data stays published."
               if held else "Published without it: publish_policy allow_missing_sources is true.")
        )
    return blocking_result(
        context, passed=not held, description=description,
        metadata={"last_published_sources": ", ".join(before) or "none",
                  "tonight_sources": ", ".join(tonight) or "none",
                  "missing": ", ".join(missing) or "none"},
    )


def missing_sources(last_published: list[str], tonight: list[str]) -> list[str]:
    """Variables of the sources the last published night came from that are not configured tonight."""
    return [variable for variable in last_published if variable not in tonight]


def _has_history(conn) -> bool:
    return bool(conn.execute("""
        SELECT count(*) FROM information_schema.tables
        WHERE table_schema = 'marts' AND table_name = 'org_summary_history'""").fetchone()[0])


marts_assets = [org_summary]
marts_checks = [contract_invariants, pull_is_plausible, no_source_went_missing]
