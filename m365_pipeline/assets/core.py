"""Core layer: license rules, per-user license classification, and normalized users.

Every transform is one set-based SQL statement in DuckDB (``m365_pipeline/sql``);
Python only wires them to Dagster and reports what they found.
"""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from dagster_duckdb import DuckDBResource

from m365_pipeline.crashpoints import crash_point
from m365_pipeline.duckdb_helpers import (
    ensure_schema,
    last_collected,
    markdown_table,
    run_sql,
    table_metadata,
    table_result,
    table_schema,
)
from m365_pipeline.license_rules import default_rules_path, load_rules, register_rules
from m365_pipeline.raw_tables import RAW_TABLES

GROUP = "core"
RAW = {table.name: AssetKey([table.schema, table.name]) for table in RAW_TABLES}
EXAMPLES = 10


LICENSE_RULES_SCHEMA = table_schema(
    ("rule_order", "INTEGER", "Position in the rules file; the first matching rule decides."),
    ("rule_id", "VARCHAR", "Stable rule name, referenced by core.license_assignments."),
    ("applies_to", "VARCHAR", "m365 (is it an M365 license?) or email (is it an ES license?)."),
    ("effect", "VARCHAR", "require (must match), include (any may match) or exclude (must not match)."),
    ("field", "VARCHAR", "vendor or license_name."),
    ("match", "VARCHAR", "contains or glob (* = any text); always case-insensitive."),
    ("pattern", "VARCHAR", "The pattern as written in the rules file."),
    ("like_pattern", "VARCHAR", "The pattern as the SQL LIKE DuckDB evaluates."),
    ("description", "VARCHAR", "Why the rule exists."),
)
LICENSE_ASSIGNMENTS_SCHEMA = table_schema(
    ("user_principal_name", "VARCHAR", "The user's key: trimmed, lower-cased UPN."),
    ("license_name", "VARCHAR", "applicationName, or name when empty; one spelling per case-insensitive name."),
    ("vendor", "VARCHAR", "Vendor as source S reports it."),
    ("is_m365_license", "BOOLEAN", "Contract rule 4."),
    ("is_email_license", "BOOLEAN", "Contract rule 5 (an Exchange mailbox license)."),
    ("m365_rule", "VARCHAR", "rule_id that decided is_m365_license."),
    ("email_rule", "VARCHAR", "rule_id that decided is_email_license; null when no include pattern matched."),
)
BACKUP_ACCOUNTS_SCHEMA = table_schema(
    ("organization_name", "VARCHAR", "Organization (rule 1) of the tenant holding the accounts."),
    ("user_principal_name", "VARCHAR", "The accounts' key: trimmed, lower-cased UPN."),
    ("name", "VARCHAR", "The accounts' name, trimmed; the first by name when several; null when empty."),
    ("licensed", "BOOLEAN", "Any of the accounts is licensed (source B's stand-in, rule 6)."),
    ("backup_status", "VARCHAR", "Rule 13: active beats excluded beats available; anything else is none."),
    ("unknown_status", "VARCHAR", "A status rule 13 does not know (read as none); the least if several."),
    ("accounts", "INTEGER", "Rule-2 accounts with this key in this organization."),
)
USERS_SCHEMA = table_schema(
    ("user_principal_name", "VARCHAR", "The user's key: trimmed, lower-cased UPN."),
    ("organization_name", "VARCHAR", "Organization (contract rule 3); null when unassigned."),
    ("organization_source", "VARCHAR", "backup_account, domain, or null."),
    ("display_name", "VARCHAR", "Source S displayName, else source B name, else the UPN."),
    ("licenses", "VARCHAR", "Distinct M365 license names, sorted, joined with ', '."),
    ("m365_licensed", "BOOLEAN", "Holds at least one M365 license."),
    ("has_email_license", "BOOLEAN", "Holds at least one email (ES) license."),
    ("classification_source", "VARCHAR", "saas when source S knows the user, else backup (stand-in)."),
    ("known_to_saas", "BOOLEAN", "Source S lists the user."),
    ("known_to_backup", "BOOLEAN", "Source B has an m365 mailbox for the user."),
    ("account_organizations", "INTEGER", "Organizations holding a mailbox for this UPN."),
    ("published", "BOOLEAN", "Served by the API: has an organization and an M365 license."),
)


@asset(
    key=["core", "license_rules"], group_name=GROUP, kinds={"duckdb", "csv"},
    metadata=table_metadata("core.license_rules", LICENSE_RULES_SCHEMA),
)
def license_rules(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one classification rule from the package's editable license_rules.csv.

    Analysts join core.license_assignments.m365_rule / email_rule to rule_id to see why
    a license was (not) counted.
    """
    path = default_rules_path()
    rules = load_rules(path)
    with duckdb.get_connection() as conn:
        ensure_schema(conn, "core")
        register_rules(conn, rules)
        run_sql(conn, "core_license_rules.sql")
        return table_result(conn, "core.license_rules", rules_file=MetadataValue.path(str(path)))


@asset(
    key=["core", "license_assignments"], group_name=GROUP, kinds={"duckdb"},
    # Every raw table: last_collected (the catalog's first_seen) reads them all.
    deps=[*RAW.values(), license_rules],
    metadata=table_metadata("core.license_assignments", LICENSE_ASSIGNMENTS_SCHEMA),
)
def license_assignments(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one user holding one distinct license (names equal ignoring case count once).

    Says whether it is an M365 license and an email (ES) license, and which rule decided.
    Also maintains core.license_catalog, every license name ever seen, for the new-license check.
    """
    with duckdb.get_connection() as conn:
        run_sql(conn, "core_license_assignments.sql")
        crash_point("transform")
        run_sql(conn, "core_license_catalog.sql", [last_collected(conn)])
        stats = conn.execute("""
            SELECT count(DISTINCT lower(license_name)), count(*) FILTER (WHERE is_m365_license),
                   count(*) FILTER (WHERE is_email_license)
            FROM core.license_assignments
        """).fetchone()
        return table_result(
            conn, "core.license_assignments",
            preview_sql="""
                SELECT license_name, any_value(vendor) AS vendor, bool_or(is_m365_license) AS m365,
                       bool_or(is_email_license) AS email, any_value(m365_rule) AS m365_rule,
                       any_value(email_rule) AS email_rule, count(*) AS users
                FROM core.license_assignments GROUP BY license_name ORDER BY users DESC, license_name LIMIT 25
            """,
            distinct_licenses=stats[0], m365_assignments=stats[1], email_assignments=stats[2],
        )


@asset(
    key=["core", "backup_accounts"], group_name=GROUP, kinds={"duckdb"},
    deps=[RAW["backup_organizations"], RAW["backup_tenants"], RAW["backup_accounts"]],
    metadata=table_metadata("core.backup_accounts", BACKUP_ACCOUNTS_SCHEMA),
)
def backup_accounts(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one user key's rule-2 accounts (m365 mailboxes) in one organization of source B.

    Source B's accounts read, joined to their tenant and organization, and normalised once for
    core.users (rules 2, 3, 6) and core.backup_coverage (rule 13).
    """
    with duckdb.get_connection() as conn:
        ensure_schema(conn, "core")
        run_sql(conn, "core_backup_accounts.sql")
        accounts, several = conn.execute(
            "SELECT coalesce(sum(accounts), 0), count(*) FILTER (WHERE accounts > 1) FROM core.backup_accounts"
        ).fetchone()
        return table_result(conn, "core.backup_accounts", rule2_accounts=int(accounts),
                            keys_with_several_accounts=several)


@asset(
    key=["core", "users"], group_name=GROUP, kinds={"duckdb"},
    deps=[backup_accounts, RAW["backup_tenants"], RAW["backup_organizations"], RAW["saas_users"],
          license_assignments],
    metadata=table_metadata("core.users", USERS_SCHEMA),
)
def users(context: AssetExecutionContext, duckdb: DuckDBResource) -> MaterializeResult:
    """One row = one person, keyed by trimmed lower-cased UPN, merged from both sources.

    Carries the organization (or null when unassigned), display name, M365 licenses, whether
    the user is M365-licensed and an ES user, which source decided, and whether it is published.
    """
    with duckdb.get_connection() as conn:
        run_sql(conn, "core_users.sql")
        counts = conn.execute("""
            SELECT count(*) FILTER (WHERE published), count(*) FILTER (WHERE organization_name IS NULL),
                   count(*) FILTER (WHERE classification_source = 'backup')
            FROM core.users
        """).fetchone()
        return table_result(
            conn, "core.users",
            preview_sql="SELECT * FROM core.users WHERE published LIMIT 10",
            published_users=counts[0], unassigned_users=counts[1], classified_by_backup=counts[2],
        )


def _examples(conn, sql: str) -> str:
    rows = conn.execute(sql).fetchall()
    return ", ".join(str(row[0]) for row in rows)


@asset_check(asset=users, description="Users no organization claims (not published). A human should look.")
def unassigned_users(context: AssetCheckExecutionContext, duckdb: DuckDBResource) -> AssetCheckResult:
    with duckdb.get_connection() as conn:
        count = conn.execute("SELECT count(*) FROM core.users WHERE organization_name IS NULL").fetchone()[0]
        licensed = conn.execute(
            "SELECT count(*) FROM core.users WHERE organization_name IS NULL AND m365_licensed").fetchone()[0]
        examples = _examples(conn, f"""
            SELECT user_principal_name FROM core.users WHERE organization_name IS NULL
            ORDER BY m365_licensed DESC, user_principal_name LIMIT {EXAMPLES}""")
    return AssetCheckResult(
        passed=count == 0, severity=AssetCheckSeverity.WARN,
        description=None if count == 0 else (
            f"{count} users belong to no organization ({licensed} of them M365-licensed) and are not published: "
            "their domain is owned by no organization or by several."),
        metadata={"unassigned_users": count, "unassigned_licensed_users": licensed, "examples": examples},
    )


@asset_check(asset=users, description="UPNs with mailboxes in several organizations (assigned to one).")
def upn_in_several_organizations(context: AssetCheckExecutionContext, duckdb: DuckDBResource) -> AssetCheckResult:
    with duckdb.get_connection() as conn:
        count = conn.execute("SELECT count(*) FROM core.users WHERE account_organizations > 1").fetchone()[0]
        examples = _examples(conn, f"""
            SELECT user_principal_name || ' -> ' || organization_name FROM core.users
            WHERE account_organizations > 1 ORDER BY user_principal_name LIMIT {EXAMPLES}""")
    return AssetCheckResult(
        passed=count == 0, severity=AssetCheckSeverity.WARN,
        description=None if count == 0 else (
            f"{count} UPNs have mailboxes in several organizations; each was assigned to the organization "
            "whose tenant has its domain, else the first by name."),
        metadata={"upns": count, "examples": examples},
    )


@asset_check(asset=license_assignments,
             description="License names seen for the first time tonight: do the rules classify them right?")
def new_license_names(context: AssetCheckExecutionContext, duckdb: DuckDBResource) -> AssetCheckResult:
    with duckdb.get_connection() as conn:
        now = last_collected(conn)
        earlier = conn.execute("SELECT count(*) FROM core.license_catalog WHERE first_seen < $1",
                               [now]).fetchone()[0]
        new = conn.execute("""
            SELECT license_name, is_m365_license, is_email_license FROM core.license_catalog
            WHERE first_seen = $1 ORDER BY lower(license_name), license_name""", [now]).fetchall()
    if earlier == 0:  # the first run ever: everything is new, nothing to flag
        return AssetCheckResult(passed=True, metadata={"new_license_names": 0, "first_run": True})
    return AssetCheckResult(
        passed=not new, severity=AssetCheckSeverity.WARN,
        description=None if not new else f"{len(new)} license names never seen before; check license_rules.csv.",
        metadata={
            "new_license_names": len(new),
            "names": MetadataValue.md(markdown_table(("license", "M365", "email"), new)),
        },
    )


core_assets = [license_rules, license_assignments, backup_accounts, users]
core_checks = [unassigned_users, upn_in_several_organizations, new_license_names]
