"""Hand-written vendor rows for the data-contract tests (docs/RULES.md, rules 1-10).

``RawBuilder`` creates the five raw tables exactly as the raw layer defines them
(``RAW_TABLES``: the vendor columns plus ``collected_at TIMESTAMPTZ``) in a DuckDB file and
fills them with the few rows a test names. Values always travel as query parameters; only
column and table names from ``RAW_TABLES`` (constants) are ever put into SQL text.

    b = RawBuilder(path)
    b.org("o1", "Acme").tenant("o1", "t1", "acme.com")
    b.account("o1", "t1", "ann@acme.com", name="Ann", licensed=True)
    b.saas_user("s1", username="ann@acme.com").subscription("s1", "Microsoft 365 E3")
    b.write()
    run_contract(path)
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from dagster import materialize

from m365_pipeline.definitions import pipeline_resources
from m365_pipeline.raw_tables import RAW_TABLES
from m365_pipeline.resources import BackupApiResource, SaasApiResource

from .helpers import dicts, query

MICROSOFT = "Microsoft Corporation"
COLLECTED_AT = datetime(2026, 1, 21, 23, 0, 0, tzinfo=UTC)
_TABLES = {table.qualified: table for table in RAW_TABLES}


class RawBuilder:
    """Collects rows per raw table; ``write()`` (re)creates all five tables in the file."""

    def __init__(self, path: Path | str, collected_at: datetime = COLLECTED_AT):
        self.path = Path(path)
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in _TABLES}
        self.collected_at: dict[str, datetime] = {name: collected_at for name in _TABLES}
        self._ids = itertools.count(1)

    # -- one method per vendor record ------------------------------------------------------

    def org(self, owner_id: str, organization_name: str) -> RawBuilder:
        """A source B organization owner (GET /users + GET /users/{id})."""
        return self._add("raw.backup_organizations", id=owner_id, organization_name=organization_name,
                         email=f"owner-{owner_id}@example.invalid")

    def tenant(self, owner_id: str, tenant_id: str, domain: str, type: str = "m365") -> RawBuilder:
        return self._add("raw.backup_tenants", owner_id=owner_id, id=tenant_id, domain=domain, type=type,
                         status=7)

    def account(self, owner_id: str, tenant_id: str, upn: str, *, name: str | None = None,
                mailbox: bool | None = True, licensed: bool | None = True, type: str = "m365",
                status: str | None = "active") -> RawBuilder:
        """A mailbox (``mailbox=True``) or public folder (``mailbox=False``); ``licensed`` true or null."""
        return self._add("raw.backup_accounts", owner_id=owner_id, tenant_id=tenant_id, upn=upn, email=upn,
                         name=name, mailbox=mailbox, licensed=licensed, type=type, status=status)

    def saas_user(self, id: str, *, username: str | None = None, email: str | None = None,
                  display_name: str | None = None) -> RawBuilder:
        return self._add("raw.saas_users", id=id, username=username, email=email, display_name=display_name,
                         status="Active")

    def subscription(self, user_id: str, application_name: str | None = None, *, name: str | None = None,
                     vendor: str | None = MICROSOFT) -> RawBuilder:
        return self._add("raw.saas_user_subscriptions", user_id=user_id, id=f"sub-{next(self._ids)}",
                         application_name=application_name, name=name, vendor=vendor)

    # -- conveniences ------------------------------------------------------------------------

    def person(self, upn: str, *licenses: str, display_name: str | None = None,
               vendor: str = MICROSOFT) -> RawBuilder:
        """A source S user (username = ``upn``) holding ``licenses`` from ``vendor``."""
        user_id = f"s-{next(self._ids)}"
        self.saas_user(user_id, username=upn, display_name=display_name)
        for license_name in licenses:
            self.subscription(user_id, license_name, vendor=vendor)
        return self

    def collected(self, table: str, when: datetime) -> RawBuilder:
        """Set ``collected_at`` of one raw table (e.g. ``"raw.saas_users"``)."""
        assert table in self.collected_at, table
        self.collected_at[table] = when
        return self

    # -- output ------------------------------------------------------------------------------

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(str(self.path)) as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
            for name, table in _TABLES.items():
                columns = [c.name for c in table.columns] + ["collected_at"]
                types = [c.sql_type for c in table.columns] + ["TIMESTAMPTZ"]
                ddl = ", ".join(f"{col} {typ}" for col, typ in zip(columns, types, strict=True))
                conn.execute(f"CREATE OR REPLACE TABLE {name} ({ddl})")
                insert = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                for row in self.rows[name]:
                    values = [row.get(col) for col in columns[:-1]] + [self.collected_at[name]]
                    conn.execute(insert, values)
        return self.path

    def _add(self, table: str, **values: Any) -> RawBuilder:
        known = {c.name for c in _TABLES[table].columns}
        unknown = set(values) - known
        assert not unknown, f"{table} has no column(s) {sorted(unknown)}"
        self.rows[table].append(values)
        return self


# -- running the core/marts assets and reading their tables ---------------------------------

def contract_resources(path: Path) -> dict[str, Any]:
    """Hand-written raw rows stand in for the vendors, so neither source is configured."""
    return pipeline_resources(SaasApiResource(), BackupApiResource(), path)


def run_contract(path: Path) -> None:
    """Materialize core.* and marts.* over the raw tables already in ``path``."""
    from m365_pipeline.assets.core import core_assets
    from m365_pipeline.assets.coverage import coverage_assets
    from m365_pipeline.assets.marts import marts_assets

    result = materialize([*core_assets, *marts_assets, *coverage_assets], resources=contract_resources(path),
                         selection=None, raise_on_error=True)
    assert result.success


def build_and_publish(builder: RawBuilder, *, raise_on_error: bool = True):
    """Like ``build_and_run`` (no checks), then the publish step, which records the night (rule 11) with its
    backup seats (rule 14: so the coverage assets it depends on run too)."""
    from m365_pipeline.assets.core import core_assets
    from m365_pipeline.assets.coverage import coverage_assets
    from m365_pipeline.assets.export import dashboard_api
    from m365_pipeline.assets.marts import marts_assets

    return materialize([*core_assets, *marts_assets, *coverage_assets, dashboard_api],
                       resources=contract_resources(builder.write()), raise_on_error=raise_on_error)


def build_and_run(builder: RawBuilder) -> Path:
    run_contract(builder.write())
    return builder.path


def users(path: Path) -> dict[str, dict[str, Any]]:
    """core.users by user_principal_name."""
    found = dicts(path, "SELECT * FROM core.users")
    by_key = {row["user_principal_name"]: row for row in found}
    assert len(by_key) == len(found), "core.users has more than one row for a key"
    return by_key


def summary(path: Path) -> dict[str, tuple[int, int]]:
    """marts.org_summary as {organization_name: (es_user_count, m365_licensed_user_count)}."""
    found = query(path, "SELECT organization_name, es_user_count, m365_licensed_user_count FROM marts.org_summary")
    by_org = {org: (es, m365) for org, es, m365 in found}
    assert len(by_org) == len(found), "marts.org_summary has more than one row for an organization"
    return by_org


def assignments(path: Path, upn: str) -> dict[str, dict[str, Any]]:
    """core.license_assignments of one user by license_name."""
    found = dicts(path, "SELECT * FROM core.license_assignments WHERE user_principal_name = ?", [upn])
    return {row["license_name"]: row for row in found}


def rule(path: Path, rule_id: str | None) -> dict[str, Any] | None:
    if rule_id is None:
        return None
    found = dicts(path, "SELECT * FROM core.license_rules WHERE rule_id = ?", [rule_id])
    assert len(found) == 1, f"rule {rule_id!r} is not exactly once in core.license_rules"
    return found[0]
