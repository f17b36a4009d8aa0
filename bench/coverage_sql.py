"""What backup coverage (rule 13) adds to the nightly transform, at any scale, without the 11-minute pull.

    .venv/bin/python bench/coverage_sql.py --orgs 2000 --users-per-org 500   # the 1M scale of make bench

The simulator's dataset (the records `m365-simulate` serves, generated in-process rather than over
HTTP) is landed through the product's own staging files into a DuckDB file with the product's memory
limit. Then, repeated, on one connection per statement as the assets do: the transforms of rules 1-10
(core.license_rules, core.license_assignments, core.users, marts.org_summary) and those of rule 13
(core.backup_coverage, marts.org_backup_coverage, and the queries of its three WARN checks). Prints
the medians and the share as JSON; bench/RESULTS.md records a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from m365_pipeline.assets.coverage import GAPS
from m365_pipeline.duckdb_helpers import LAST_COLLECTED_SQL, ensure_schema, run_sql
from m365_pipeline.landing import StagingFile
from m365_pipeline.license_rules import default_rules_path, load_rules, register_rules
from m365_pipeline.raw_tables import (
    BACKUP_ACCOUNTS,
    BACKUP_ORGANIZATIONS,
    BACKUP_TENANTS,
    SAAS_USER_SUBSCRIPTIONS,
    SAAS_USERS,
)
from m365_pipeline.simulator.dataset import Dataset, SimulatorConfig


@dataclass(frozen=True)
class Origin:
    what: str

    def describe(self) -> str:
        return self.what


def land(ds: Dataset, conn: duckdb.DuckDBPyConnection, staging: Path) -> None:
    collected = datetime.now(UTC).replace(microsecond=0)
    files = {table.name: StagingFile(staging, table) for table in
             (SAAS_USERS, SAAS_USER_SUBSCRIPTIONS, BACKUP_ORGANIZATIONS, BACKUP_TENANTS, BACKUP_ACCOUNTS)}
    for user in ds.saas_users():
        files["saas_users"].add([user], origin=Origin("users"))
        files["saas_user_subscriptions"].add(ds.saas_subscriptions(user["id"]), origin=Origin("subs"),
                                             user_id=user["id"])
    for owner in ds.backup_owners():
        files["backup_organizations"].add([owner], origin=Origin("owners"))
        for tenant in ds.backup_tenants(owner["id"]):
            files["backup_tenants"].add([tenant], origin=Origin("tenants"), owner_id=owner["id"])
            files["backup_accounts"].add(ds.backup_accounts(owner["id"], tenant["id"]), origin=Origin("accounts"),
                                         owner_id=owner["id"], tenant_id=tenant["id"])
    ensure_schema(conn, "raw")
    for staging_file in files.values():
        staging_file.load(conn, collected)


def contract_transforms(conn: duckdb.DuckDBPyConnection) -> None:
    register_rules(conn, load_rules(default_rules_path()))
    run_sql(conn, "core_license_rules.sql")
    conn.unregister("rules_frame")
    run_sql(conn, "core_license_assignments.sql")
    run_sql(conn, "core_backup_accounts.sql")
    run_sql(conn, "core_users.sql")
    run_sql(conn, "marts_org_summary.sql", [conn.execute(LAST_COLLECTED_SQL).fetchone()[0]])


def coverage_transforms(conn: duckdb.DuckDBPyConnection) -> None:
    run_sql(conn, "core_backup_coverage.sql")
    run_sql(conn, "marts_org_backup_coverage.sql")
    for where in GAPS.values():  # what the WARN checks ask
        conn.execute(f"SELECT organization_name, count(*) FROM core.backup_coverage WHERE {where} GROUP BY 1"
                     ).fetchall()
    conn.execute("SELECT count(*) FROM core.backup_coverage WHERE unknown_status IS NOT NULL").fetchall()


def timed(path: Path, step) -> float:
    with duckdb.connect(str(path), config={"memory_limit": "1GB"}) as conn:
        started = time.perf_counter()
        step(conn)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=2000)
    parser.add_argument("--users-per-org", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database", type=Path, default=None,
                        help="keep the landed DuckDB file here, and reuse it when it exists (skips the landing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="m365-coverage-bench-") as work:
        path = args.database or Path(work) / "m365.duckdb"
        started = time.perf_counter()
        with duckdb.connect(str(path), config={"memory_limit": "1GB"}) as conn:
            if args.database is None or not conn.execute(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'raw'").fetchone()[0]:
                land(Dataset(SimulatorConfig(orgs=args.orgs, users_per_org=args.users_per_org, seed=42)),
                     conn, Path(work) / "staging")
            ensure_schema(conn, "core")
            ensure_schema(conn, "marts")
            rows = {name: conn.execute(f"SELECT count(*) FROM raw.{name}").fetchone()[0] for name in
                    ("saas_users", "saas_user_subscriptions", "backup_organizations", "backup_tenants",
                     "backup_accounts")}
        landed_s = time.perf_counter() - started
        contract, coverage = [], []
        for _ in range(args.repeats):  # the same order as the nightly job: rules 1-10 first
            contract.append(timed(path, contract_transforms))
            coverage.append(timed(path, coverage_transforms))
        with duckdb.connect(str(path), read_only=True) as conn:
            coverage_rows = conn.execute("SELECT count(*) FROM core.backup_coverage").fetchone()[0]
            users = conn.execute("SELECT count(*) FROM core.users").fetchone()[0]
    contract_s, coverage_s = statistics.median(contract), statistics.median(coverage)
    print(json.dumps({
        "orgs": args.orgs, "users_per_org": args.users_per_org, "raw_rows": rows, "core_users": users,
        "coverage_rows": coverage_rows, "landing_s": round(landed_s, 1), "repeats": args.repeats,
        "contract_transforms_s": round(contract_s, 2), "coverage_transforms_s": round(coverage_s, 2),
        "coverage_share_of_transform": round(coverage_s / contract_s, 3),
        "all_contract_s": [round(s, 2) for s in contract], "all_coverage_s": [round(s, 2) for s in coverage],
    }, indent=1))


if __name__ == "__main__":
    main()
