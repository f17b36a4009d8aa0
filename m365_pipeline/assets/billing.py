"""Billing months (docs/RULES.md, rules 14 and 15): computed, sealed and published by the publish step.

Inside the publish step's transaction, right after tonight's night is recorded, tonight's license holders
join marts.org_license_history; the figures are then the stored macros of sql/marts_billing.sql
(marts.billing_month, billing_licenses_all, billing_items). A month with a later kept night is closed:
the first run that publishes such a night writes its bodies into marts.billing_sealed (rule 15), and
every later version publishes exactly those bytes (hard links to the served version's files where it has
them). The one open month (tonight's) is computed afresh at each publish. After the version is current,
each newly sealed month is announced once to the alert webhook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
from dagster import AssetKey, AssetSpec

from m365_pipeline import alerts
from m365_pipeline.api_bodies import (
    BILLING_BASES,
    BILLING_METRICS,
    BILLING_PARTS,
    CONTENT_TYPES,
    FORMATS,
    billing_file_name,
    billing_key,
    billing_month_bodies,
)
from m365_pipeline.duckdb_helpers import fetch_dicts, read_sql, table_metadata, table_schema
from m365_pipeline.publishing import MANIFEST, VersionWriter, current_version_dir, etag

BILLING_SQL = "marts_billing.sql"
LICENSE_COUNTS_SQL = "marts_org_license_history.sql"
SEALED_KEY = AssetKey(["marts", "billing_sealed"])
SEALED_SCHEMA = table_schema(
    ("month", "VARCHAR", "The billing month, YYYY-MM (rule 14)."),
    ("part", "VARCHAR", "report (GET /billing), items (GET /billing/items) or organizations (GET /billing?org=)."),
    ("organization_name", "VARCHAR", "The organization of an organizations body; null for the others."),
    ("fmt", "VARCHAR", "json or csv."),
    ("body", "BLOB", "The exact bytes the API answers for this month, from its sealing on (rule 15)."),
    ("sealed_by", "DATE", "The night whose publish closed the month and sealed it."),
    ("announced_at", "TIMESTAMPTZ", "When the month's close was announced (or found no webhook to announce to)."),
)
SEALED_SPEC = AssetSpec(
    SEALED_KEY, group_name="marts", kinds={"duckdb"},
    description="One row = one body of a closed billing month, sealed (rule 15): written once by the first run "
                "that publishes a night after the month, never rewritten. marts.billing_month(m), "
                "marts.billing_licenses(m, org) and marts.billing_items(m) compute any month from the kept nights.",
    metadata=table_metadata("marts.billing_sealed", SEALED_SCHEMA),
)
SEALED_PREVIEW = """
    SELECT month, any_value(sealed_by) AS sealed_by,
           count(*) FILTER (WHERE part = 'organizations') // 2 AS organizations, any_value(announced_at) AS announced_at
    FROM marts.billing_sealed GROUP BY month ORDER BY month DESC LIMIT 14"""


def record_license_counts(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """In the open transaction, after tonight's night is recorded: marts.org_license_history for every kept
    night after the latest it has (tonight; after a forgotten night, the nights from it; on a database from
    before the table, all of them), in date order, since each night's holders are the night before's plus its
    changes (sql/marts_org_license_history.sql). None while no published user ever held a license. Returns
    the nights recorded."""
    nights = [night for (night,) in conn.execute("""
        SELECT collection_date FROM marts.nights
        WHERE collection_date > coalesce((SELECT max(collection_date) FROM marts.org_license_history),
                                         DATE '1970-01-01')
          AND EXISTS (SELECT 1 FROM marts.published_users_history WHERE licenses <> '')
        ORDER BY 1""").fetchall()]
    for night in nights:
        conn.execute("CREATE OR REPLACE TEMP TABLE license_night AS SELECT $1::DATE AS d", [night])
        conn.execute(read_sql(LICENSE_COUNTS_SQL))
    return [night.isoformat() for night in nights]


def month_bodies(conn: duckdb.DuckDBPyConnection, month: str) -> dict[tuple[str, str | None, str], bytes]:
    """Every body of ``month`` from the kept nights now (api_bodies.billing_month_bodies): each macro run
    once, the organizations' license rows being the items' own."""
    closed, nights, first_night, last_night, days = conn.execute(
        "SELECT * FROM marts.billing_month_header($1)", [month]).fetchone()
    header = {"month": month, "closed": bool(closed), "nights": nights, "first_night": first_night.isoformat(),
              "last_night": last_night.isoformat(), "days": days}
    return billing_month_bodies(header, fetch_dicts(conn.execute("SELECT * FROM marts.billing_month($1)", [month])),
                                fetch_dicts(conn.execute("SELECT * FROM marts.billing_items($1)", [month])))


def seal_and_write(conn: duckdb.DuckDBPyConnection, writer: VersionWriter, tonight: str
                   ) -> tuple[dict[str, Any], list[str]]:
    """In the open transaction, after tonight's night is recorded: seal every closed month not sealed yet,
    then write every sealed month (its sealed bytes) and the open month into the version.

    Returns the manifest's ``billing`` entry and the months sealed now.
    """
    record_license_counts(conn)
    months = [m for (m,) in conn.execute(
        "SELECT DISTINCT strftime(collection_date, '%Y-%m') FROM marts.nights ORDER BY 1").fetchall()]
    sealed = {m for (m,) in conn.execute("SELECT DISTINCT month FROM marts.billing_sealed").fetchall()}
    sealing_now = [m for m in months if m < tonight[:7] and m not in sealed]
    sealed_bodies: dict[str, dict[tuple[str, str | None, str], bytes]] = {}  # month: its sealed bodies
    for month in sealing_now:
        sealed_bodies[month] = month_bodies(conn, month)
        keys, bodies = zip(*sealed_bodies[month].items(), strict=True)
        conn.execute("""
            INSERT INTO marts.billing_sealed
            SELECT $1, unnest($2), unnest($3), unnest($4), unnest($5::BLOB[]), $6::DATE, NULL""",  # one statement
                     [month, *map(list, zip(*keys, strict=True)), list(bodies), tonight])
    entry: dict[str, Any] = {}
    previous = current_version_dir(writer.root)
    previous_manifest = json.loads((previous / MANIFEST).read_bytes()) if previous else {}
    for month in sorted(sealed | set(sealing_now)):
        if month in sealed and _link_sealed_month(conn, writer, previous, previous_manifest, month):
            entry[month] = previous_manifest["billing"][month]
            continue
        if month not in sealed_bodies:  # sealed by an earlier run: its bytes as sealed
            rows = conn.execute("SELECT part, organization_name, fmt, body FROM marts.billing_sealed WHERE month = $1",
                                [month]).fetchall()
            sealed_bodies[month] = {(part, org, fmt): body for part, org, fmt, body in rows}
        entry[month] = _write_month(writer, month, sealed_bodies[month], True)
    open_month = months[-1] if months else None
    if open_month is not None and open_month not in entry:
        entry[open_month] = _write_month(writer, open_month, month_bodies(conn, open_month), False)
    return {"billing": entry}, sealing_now


def _link_sealed_month(conn: duckdb.DuckDBPyConnection, writer: VersionWriter, previous: Path | None,
                       manifest: dict[str, Any], month: str) -> bool:
    """A sealed month's files as the version being served has them (written from its sealed bytes, never
    changed since), taken by hard link; False where that version has not them all, closed, or its seal (the
    report CSV's ETag) is not the one in marts.billing_sealed (a database restored or replaced under it)."""
    keys = [billing_key(month, part, fmt) for part in BILLING_PARTS for fmt in FORMATS]
    files = manifest.get("files", {})
    if previous is None or not manifest.get("billing", {}).get(month, {}).get("closed") \
            or not all(key in files for key in keys):
        return False
    (report_csv,) = conn.execute("""
        SELECT body FROM marts.billing_sealed WHERE month = $1 AND part = 'report' AND fmt = 'csv'""",
                                 [month]).fetchone()
    if files[billing_key(month, "report", "csv")]["etag"] != etag(bytes(report_csv)):
        return False
    return writer.link(previous, {key: files[key] for key in keys})


def _write_month(writer: VersionWriter, month: str, bodies: dict[tuple[str, str | None, str], bytes],
                 closed: bool) -> dict[str, Any]:
    """The month's files: report and items (each JSON and CSV) and every organization's bodies back to back in
    one file per format; returns the manifest's entry for the month, {closed, organizations: {name: [json
    offset, json length, csv offset, csv length]}}."""
    for part in BILLING_PARTS[:2]:
        for fmt in FORMATS:
            writer.write_bytes(billing_key(month, part, fmt), billing_file_name(month, part, fmt),
                               bytes(bodies[(part, None, fmt)]), CONTENT_TYPES[fmt])
    names = sorted({org for part, org, _ in bodies if part == "organizations"})
    ranges: dict[str, list[int]] = {name: [] for name in names}
    for fmt in FORMATS:
        path = writer.adopt(billing_key(month, "organizations", fmt), billing_file_name(month, "organizations", fmt),
                            CONTENT_TYPES[fmt])
        with path.open("wb") as out:
            for name in names:
                body = bytes(bodies[("organizations", name, fmt)])
                ranges[name] += [out.tell(), len(body)]
                out.write(body)
    return {"closed": closed, "organizations": ranges}


def announce_sealed_months(conn: duckdb.DuckDBPyConnection, log: Any, run_id: str | None, job: str | None) -> int:
    """After the version is current: announce each sealed month not announced yet, once (the mark is set in
    DuckDB once the webhook took it, or when none is configured). A webhook that fails leaves the month
    for the next publishing run, and never fails this one: its night is already served."""
    announced = 0
    for month, body in conn.execute("""
            SELECT month, body FROM marts.billing_sealed
            WHERE part = 'report' AND fmt = 'json' AND announced_at IS NULL ORDER BY month""").fetchall():
        try:
            sent = alerts.send(closed_month_alert(month, bytes(body), run_id, job))
        except Exception as exc:
            log.warning(f"the close of billing month {month} was not announced: {exc}")
            continue
        conn.execute("UPDATE marts.billing_sealed SET announced_at = now() WHERE month = $1", [month])
        announced += sent
    return announced


def closed_month_alert(month: str, report_json: bytes, run_id: str | None, job: str | None) -> alerts.Alert:
    """The "billing month closed" message: the month, its customers, the totals on every basis and the seal."""
    report = json.loads(report_json)
    totals = report["totals"]
    labels = {"es_user_count": "ES users", "m365_licensed_user_count": "M365-licensed users",
              "backup_seats": "Backup seats"}
    details = [("Month", month), ("Customers", str(totals["total_organizations"]))]
    details += [(labels[metric], ", ".join(f"{basis.replace('_', '-')} {totals[f'total_{metric}_{basis}']}"
                                            for basis in BILLING_BASES)) for metric in BILLING_METRICS]
    details.append(("SHA-256 of the month's CSV", report["sha256"]))
    reason = (f"billing month {month} closed with {report['nights']} kept nights "
              f"({report['first_night']} to {report['last_night']}) and is sealed: "
              f"GET /api/m365/billing?month={month} answers these numbers from now on")
    return alerts.Alert("billing_closed", reason, job=job, run_id=run_id, details=tuple(details))

