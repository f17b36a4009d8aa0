"""Backup coverage (docs/RULES.md, rule 13) on hand-written vendor rows: every status and its
spellings, a user with several mailboxes, a mailbox whose UPN belongs to another organization by
rule 3, and the WARN checks that name who is not protected. Expected answers are written out here."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetCheckSeverity, materialize

from m365_pipeline.assets.core import core_assets
from m365_pipeline.assets.coverage import coverage_assets, coverage_checks
from m365_pipeline.assets.marts import marts_assets
from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.simulator.truth import _smallest

from .contract_fixtures import RawBuilder, contract_resources
from .helpers import dicts, make_resources

E3 = "Microsoft 365 E3"
APPS = "Microsoft 365 Apps for business"  # an M365 license that is not an email license

# (raw status as source B spells it, the status rule 13 reads from it)
SPELLINGS = [
    ("active", "active"), ("Active", "active"), ("ACTIVE", "active"), (" active ", "active"),
    ("\tActive\n", "active"), ("excluded", "excluded"), ("Excluded ", "excluded"), ("  EXCLUDED", "excluded"),
    ("available", "available"), ("Available", "available"), (" AVAILABLE\r\n", "available"),
    (None, "none"), ("", "none"), ("   ", "none"), ("pending", "none"), ("Actively", "none"),
    ("in-active", "none"),
]


def run_coverage(builder: RawBuilder):
    result = materialize([*core_assets, *marts_assets, *coverage_assets, *coverage_checks],
                         resources=contract_resources(builder.write()), raise_on_error=True)
    assert result.success
    return result


def coverage_rows(path: Path) -> dict[tuple[str, str], dict]:
    rows = dicts(path, "SELECT * FROM core.backup_coverage")
    by_key = {(r["organization_name"], r["user_principal_name"]): r for r in rows}
    assert len(by_key) == len(rows), "a key appears more than once in an organization"
    return by_key


@pytest.fixture(scope="module")
def spellings_db(tmp_path_factory) -> Path:
    b = RawBuilder(tmp_path_factory.mktemp("spellings") / "m365.duckdb")
    b.org("o1", "Acme").tenant("o1", "t1", "acme.com")
    for i, (raw, _) in enumerate(SPELLINGS):
        upn = f"user{i}@acme.com"
        b.person(upn, E3).account("o1", "t1", upn, status=raw)
    run_coverage(b)
    return b.path


@pytest.mark.parametrize(("index", "raw", "expected"), [(i, raw, exp) for i, (raw, exp) in enumerate(SPELLINGS)],
                         ids=[repr(raw) for raw, _ in SPELLINGS])
def test_rule13_status_is_trimmed_case_insensitive_and_unknown_values_are_none(spellings_db, index, raw, expected):
    row = coverage_rows(spellings_db)[("Acme", f"user{index}@acme.com")]
    assert row["backup_status"] == expected
    assert row["has_email_license"] is True and row["m365_licensed"] is True


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    b = RawBuilder(tmp_path_factory.mktemp("coverage") / "m365.duckdb")
    b.org("o1", "Acme").tenant("o1", "t1", "acme.com").tenant("o1", "t1b", "acme2.com")
    b.tenant("o1", "tg", "acme-g.com", type="gws")
    b.org("o2", "Beta").tenant("o2", "t2", "beta.com").tenant("o2", "t2b", "beta.org")
    b.org("o3", "Empty")
    for upn, status in [("ann@acme.com", "active"), ("bob@acme.com", " Excluded "), ("cat@acme.com", "AVAILABLE"),
                        ("eve@acme.com", None), ("fay@acme.com", "pending"), ("hal@acme.com", "Active\t")]:
        b.person(upn, E3, display_name=upn.split("@")[0].title()).account("o1", "t1", upn, status=status)
    b.person("dan@acme.com", E3)  # an email user with no mailbox in the backup
    b.person("gus@acme.com", APPS).account("o1", "t1", "gus@acme.com", status="Active")
    # A shared mailbox source S does not know, unlicensed: backed up, never billed.
    b.account("o1", "t1", "Shared@Acme.com ", name="Shared Mailbox", licensed=None, status="active")
    # Several mailboxes of one user: the best status wins, whatever the order.
    b.person("multi@acme.com", E3).account("o1", "t1", "multi@acme.com", status="available")
    b.account("o1", "t1b", " MULTI@acme.com", status="  active")
    b.person("multi2@acme.com", E3).account("o1", "t1", "multi2@acme.com", status="excluded")
    b.account("o1", "t1b", "multi2@acme.com", status="available")
    # Mailboxes in Beta and Acme: rule 3 gives the user to Beta (whose tenant has the domain).
    b.person("cross@beta.com", E3, display_name="Cross Over")
    b.account("o2", "t2", "cross@beta.com", status="active").account("o1", "t1", "cross@beta.com", status="excluded")
    b.person("ivy@beta.org", E3)  # not beta.com: cross's mailbox in Acme makes Acme own it too (rule 3)
    # Never rows: a public folder, a GWS mailbox, an S user without an M365 license and no mailbox.
    b.account("o1", "t1", "pf@acme.com", mailbox=False, status="active")
    b.account("o1", "tg", "gws@acme-g.com", status="active", type="gws")
    b.person("free@acme.com", "Power BI (free)")
    run_coverage(b)
    return b.path


# (organization, key) -> (m365_licensed, has_email_license, backup_status)
EXPECTED = {
    ("Acme", "ann@acme.com"): (True, True, "active"),
    ("Acme", "bob@acme.com"): (True, True, "excluded"),
    ("Acme", "cat@acme.com"): (True, True, "available"),
    ("Acme", "dan@acme.com"): (True, True, "none"),
    ("Acme", "eve@acme.com"): (True, True, "none"),
    ("Acme", "fay@acme.com"): (True, True, "none"),
    ("Acme", "hal@acme.com"): (True, True, "active"),
    ("Acme", "gus@acme.com"): (True, False, "active"),
    ("Acme", "shared@acme.com"): (False, False, "active"),
    ("Acme", "multi@acme.com"): (True, True, "active"),
    ("Acme", "multi2@acme.com"): (True, True, "excluded"),
    ("Acme", "cross@beta.com"): (False, False, "excluded"),
    ("Beta", "cross@beta.com"): (True, True, "active"),
    ("Beta", "ivy@beta.org"): (True, True, "none"),
}


def test_rule13_rows_are_published_users_united_with_mailbox_keys_once_each(scenario):
    found = {key: (r["m365_licensed"], r["has_email_license"], r["backup_status"])
             for key, r in coverage_rows(scenario).items()}
    assert found == EXPECTED


def test_rule13_a_mailbox_of_a_user_published_elsewhere_is_an_unlicensed_row_with_rule7_display_name(scenario):
    rows = coverage_rows(scenario)
    assert rows[("Acme", "cross@beta.com")]["display_name"] == "Cross Over"
    assert rows[("Acme", "cross@beta.com")]["published_organization"] == "Beta"
    assert rows[("Acme", "shared@acme.com")]["display_name"] == "Shared Mailbox"
    assert rows[("Acme", "multi@acme.com")]["backup_accounts"] == 2
    assert rows[("Acme", "dan@acme.com")]["backup_accounts"] == 0
    assert rows[("Acme", "fay@acme.com")]["unknown_status"] == "pending"


def test_rule13_counts_per_organization_in_summary_order(scenario):
    found = dicts(scenario, "SELECT * FROM marts.org_backup_coverage")
    assert found == [
        {"organization_name": "Acme", "es_user_count": 9, "es_users_backed_up": 3, "es_users_not_backed_up": 6,
         "backed_up_without_email_license": 2},
        {"organization_name": "Beta", "es_user_count": 2, "es_users_backed_up": 1, "es_users_not_backed_up": 1,
         "backed_up_without_email_license": 0},
        {"organization_name": "Empty", "es_user_count": 0, "es_users_backed_up": 0, "es_users_not_backed_up": 0,
         "backed_up_without_email_license": 0},
    ]
    # es_user_count is the summary's (rule 8).
    summary = dicts(scenario, "SELECT organization_name, es_user_count FROM marts.org_summary")
    assert [(r["organization_name"], r["es_user_count"]) for r in summary] == [("Acme", 9), ("Beta", 2), ("Empty", 0)]


def test_warn_checks_name_who_is_not_backed_up_and_who_is_backed_up_without_email_license(tmp_path):
    b = RawBuilder(tmp_path / "m365.duckdb")
    b.org("o1", "Acme <b>Ltd</b>").tenant("o1", "t1", "acme.com")
    b.person("ann@acme.com", E3).account("o1", "t1", "ann@acme.com", status="active")
    b.person("dan@acme.com", E3, display_name="Dan | Pipe")
    b.account("o1", "t1", "shared@acme.com", licensed=None, status="Active", name="Shared")
    b.account("o1", "t1", "odd@acme.com", licensed=None, status="Frozen")
    result = run_coverage(b)
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    not_backed = checks["email_users_not_backed_up"]
    assert not not_backed.passed and not_backed.severity == AssetCheckSeverity.WARN
    assert not_backed.metadata["email_users_not_backed_up"].value == 1
    assert "dan@acme.com" in not_backed.metadata["who"].value and "Dan \\| Pipe" in not_backed.metadata["who"].value
    assert "ann@acme.com" not in not_backed.metadata["who"].value
    assert "| Acme <b>Ltd</b> | 1 |" in not_backed.metadata["per_organization"].value
    without = checks["backed_up_without_email_license"]
    assert not without.passed and without.severity == AssetCheckSeverity.WARN
    assert without.metadata["backed_up_without_email_license"].value == 1
    assert "shared@acme.com" in without.metadata["who"].value and "odd@acme.com" not in without.metadata["who"].value
    unknown = checks["unknown_backup_statuses"]
    assert not unknown.passed and "frozen" in unknown.metadata["statuses"].value


def test_warn_checks_pass_when_every_email_user_is_backed_up(tmp_path):
    b = RawBuilder(tmp_path / "m365.duckdb")
    b.org("o1", "Acme").tenant("o1", "t1", "acme.com")
    b.person("ann@acme.com", E3).account("o1", "t1", "ann@acme.com", status="active")
    result = run_coverage(b)
    assert all(e.passed for e in result.get_asset_check_evaluations())


def expected_backup_accounts(dataset) -> dict[tuple[str, str], dict]:
    """core.backup_accounts from the simulator's records in plain Python: rule 2's accounts (mailboxes of m365
    tenants, with a key) per organization and key; name, licensed, and rule 13's status of them all."""
    accounts: dict[tuple[str, str], list[dict]] = {}
    for owner in dataset.backup_owners():
        for tenant in dataset.backup_tenants(owner["id"]):
            for account in dataset.backup_accounts(owner["id"], tenant["id"]):
                if tenant["type"] == "m365" and account["mailbox"] is True and (account["upn"] or "").strip():
                    key = (owner["organization_name"], account["upn"].strip().lower())
                    accounts.setdefault(key, []).append(account)
    known = ("active", "excluded", "available")
    expected = {}
    for key, group in accounts.items():
        statuses = {(a["status"] or "").strip().lower() for a in group}
        unknown = sorted(s for s in statuses if s and s not in known)
        expected[key] = {"name": _smallest([a["name"] for a in group]),
                         "licensed": any(a["licensed"] is True for a in group),
                         "backup_status": next((s for s in known if s in statuses), "none"),
                         "unknown_status": unknown[0] if unknown else None, "accounts": len(group)}
    return expected


def test_core_backup_accounts_holds_each_organizations_rule2_accounts_once_per_key(start_simulator, db_path):
    sim = start_simulator(orgs=10, users_per_org=14, seed=5)
    materialize([*raw_assets, *core_assets], resources=make_resources(sim, db_path), raise_on_error=True)
    found = {(r.pop("organization_name"), r.pop("user_principal_name")): r
             for r in dicts(db_path, "SELECT * FROM core.backup_accounts")}
    expected = expected_backup_accounts(sim.dataset)
    assert found == expected
    # The data has what the rules are about: several accounts with one key, unknown and missing statuses.
    assert any(r["accounts"] > 1 for r in expected.values())
    assert any(r["unknown_status"] for r in expected.values())
    assert {r["backup_status"] for r in expected.values()} == {"active", "excluded", "available", "none"}
