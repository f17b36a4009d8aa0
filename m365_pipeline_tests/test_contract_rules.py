"""The data contract: how users are counted (docs/RULES.md, rules 1-10).

Each test writes a handful of hand-made vendor rows into the raw tables, materializes the
core and marts assets, and reads core.* / marts.* back. Tests are named after the rule they
prove; each one fails if its rule is broken.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path

import duckdb
import pytest

from m365_pipeline.license_rules import RULES_FILE

from .contract_fixtures import (
    MICROSOFT,
    RawBuilder,
    assignments,
    build_and_publish,
    build_and_run,
    rule,
    summary,
    users,
)
from .helpers import dicts, query, rule9


@pytest.fixture
def b(tmp_path: Path) -> RawBuilder:
    return RawBuilder(tmp_path / "data" / "m365.duckdb")


def org(b: RawBuilder, owner_id: str, name: str, *domains: str, type: str = "m365") -> RawBuilder:
    """An owner with one tenant per domain: tenant ids ``<owner>-t0``, ``<owner>-t1``, ..."""
    b.org(owner_id, name)
    for i, domain in enumerate(domains):
        b.tenant(owner_id, f"{owner_id}-t{i}", domain, type=type)
    return b


def mailbox(b: RawBuilder, owner_id: str, upn: str, *, tenant: int = 0, **kw) -> RawBuilder:
    return b.account(owner_id, f"{owner_id}-t{tenant}", upn, **kw)


# ------------------------------------------------------------------------------------------
# The tables themselves
# ------------------------------------------------------------------------------------------

CONTRACT_COLUMNS = {
    "core.license_rules": {"rule_id", "applies_to", "effect", "field", "match", "pattern", "description"},
    "core.license_assignments": {"user_principal_name", "license_name", "vendor", "is_m365_license",
                                 "is_email_license", "m365_rule", "email_rule"},
    "core.users": {"user_principal_name", "organization_name", "organization_source", "display_name",
                   "licenses", "m365_licensed", "has_email_license", "classification_source",
                   "known_to_saas", "known_to_backup", "published"},
    "marts.org_summary": {"organization_name", "es_user_count", "m365_licensed_user_count", "last_collected"},
    "marts.org_summary_history": {"collection_date", "organization_name", "es_user_count",
                                  "m365_licensed_user_count", "last_collected"},
    "marts.nights": {"collection_date", "last_collected"},
    "marts.org_license_history": {"collection_date", "organization_name", "license_name", "users",
                                  "license_users", "first_spelling"},
    "marts.published_users_history": {"organization_name", "user_principal_name", "display_name", "licenses",
                                      "has_email_license", "valid_from", "valid_to"},
}


def test_contract_tables_have_the_agreed_columns(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    build_and_publish(b)  # the night tables are written by the publish step (rule 11)
    path = b.path
    for table, expected in CONTRACT_COLUMNS.items():
        schema, name = table.split(".")
        found = {r[0] for r in query(path, "SELECT column_name FROM information_schema.columns "
                                           "WHERE table_schema = ? AND table_name = ?", [schema, name])}
        assert expected <= found, f"{table} lacks {sorted(expected - found)}"


# ------------------------------------------------------------------------------------------
# Rule 1: organizations
# ------------------------------------------------------------------------------------------

def test_rule1_owners_sharing_a_name_are_one_organization(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Acme", "acme-eu.com")
    mailbox(b, "o1", "ann@acme.com", licensed=True)
    mailbox(b, "o2", "eve@acme-eu.com", licensed=True)
    b.person("sam@acme-eu.com", "Microsoft 365 E3")  # assigned by the second owner's domain
    path = build_and_run(b)

    assert summary(path) == {"Acme": (3, 3)}
    assert {k: u["organization_name"] for k, u in users(path).items()} == {
        "ann@acme.com": "Acme", "eve@acme-eu.com": "Acme", "sam@acme-eu.com": "Acme"}


def test_rule1_organization_without_users_appears_with_zeros(b: RawBuilder) -> None:
    org(b, "o1", "Empty")                                   # no tenants at all
    org(b, "o2", "Quiet", "quiet.com")
    mailbox(b, "o2", "nobody@quiet.com", licensed=None)    # an unlicensed mailbox only
    org(b, "o3", "Google Shop", "gshop.com", type="gws")
    mailbox(b, "o3", "g@gshop.com", licensed=True, type="gws")
    org(b, "o4", "Busy", "busy.com")
    mailbox(b, "o4", "worker@busy.com", licensed=True)
    path = build_and_run(b)

    assert summary(path) == {"Empty": (0, 0), "Quiet": (0, 0), "Google Shop": (0, 0), "Busy": (1, 1)}


NAME_VARIANTS = ["Acme Corp", "ACME Corp", "acme corp", "Acme  Corp", " Acme Corp", "Acme Corp ", "Acme Corp."]


def test_rule1_names_differing_in_case_or_spacing_are_different_organizations(b: RawBuilder) -> None:
    for i, name in enumerate(NAME_VARIANTS):
        org(b, f"o{i}", name, f"d{i}.com")
        for n in range(i + 1):
            mailbox(b, f"o{i}", f"user{n}@d{i}.com", licensed=True)
    path = build_and_run(b)

    assert summary(path) == {name: (i + 1, i + 1) for i, name in enumerate(NAME_VARIANTS)}
    assert users(path)["user0@d5.com"]["organization_name"] == "Acme Corp "  # kept exactly, not trimmed


# ------------------------------------------------------------------------------------------
# Rule 2: users and their keys
# ------------------------------------------------------------------------------------------

def test_rule2_public_folders_are_ignored(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Other", "other.com")
    mailbox(b, "o1", "pf@acme.com", name="Public Folder", mailbox=False, licensed=True)
    mailbox(b, "o1", "pf@pfonly.com", mailbox=False, licensed=True)   # would make Acme own pfonly.com
    b.person("s@pfonly.com", "Microsoft 365 E3")
    mailbox(b, "o2", "room@acme.com", mailbox=False, licensed=True)    # would put room@ into Other
    b.person("room@acme.com", "Microsoft 365 E3")
    path = build_and_run(b)

    found = users(path)
    assert "pf@acme.com" not in found, "a public folder became a user"
    assert found["s@pfonly.com"]["organization_name"] is None, "a public folder's domain was owned"
    room = found["room@acme.com"]
    assert (room["organization_name"], room["organization_source"]) == ("Acme", "domain")
    assert room["known_to_backup"] is False
    assert summary(path) == {"Acme": (1, 1), "Other": (0, 0)}


def test_rule2_gws_tenants_are_never_counted(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Gee", "gee.com", "acme.com", type="gws")
    mailbox(b, "o2", "g@gee.com", name="G", licensed=True, type="gws")
    mailbox(b, "o2", "x@acme.com", tenant=1, licensed=True, type="gws")
    b.person("s@gee.com", "Microsoft 365 E3")   # gee.com is only a gws domain: nobody owns it
    b.person("x@acme.com", "Microsoft 365 E3")  # gws account does not decide; Acme owns acme.com alone
    path = build_and_run(b)

    found = users(path)
    assert "g@gee.com" not in found, "a gws account became a user"
    assert found["s@gee.com"]["organization_name"] is None
    x = found["x@acme.com"]
    assert (x["organization_name"], x["organization_source"], x["known_to_backup"]) == ("Acme", "domain", False)
    assert summary(path) == {"Acme": (1, 1), "Gee": (0, 0)}


def test_rule2_upn_key_is_trimmed_and_lower_cased(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com", "acme.net")
    mailbox(b, "o1", "  John.Doe@Acme.COM ", licensed=True)
    mailbox(b, "o1", "john.doe@ACME.com", tenant=1, licensed=None)
    b.saas_user("s1", username=" JOHN.doe@acme.COM  ", display_name="John Doe")
    b.subscription("s1", "Microsoft 365 E3")
    path = build_and_run(b)

    found = users(path)
    assert list(found) == ["john.doe@acme.com"]
    john = found["john.doe@acme.com"]
    assert (john["known_to_saas"], john["known_to_backup"]) == (True, True)
    assert (john["organization_name"], john["organization_source"]) == ("Acme", "backup_account")
    assert (john["licenses"], john["published"]) == ("Microsoft 365 E3", True)
    assert list(assignments(path, "john.doe@acme.com")) == ["Microsoft 365 E3"]


@pytest.mark.parametrize("username", [None, "", "   "], ids=["null", "empty", "blank"])
def test_rule2_saas_upn_falls_back_to_email(b: RawBuilder, username: str | None) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username=username, email=" Mail.Box@Acme.com ")
    b.subscription("s1", "Microsoft 365 E3")
    path = build_and_run(b)

    found = users(path)
    assert list(found) == ["mail.box@acme.com"]
    assert (found["mail.box@acme.com"]["organization_name"], found["mail.box@acme.com"]["licenses"]) == (
        "Acme", "Microsoft 365 E3")


def test_rule2_saas_username_wins_over_email(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username="user@acme.com", email="other@acme.com").subscription("s1", "Microsoft 365 E3")
    path = build_and_run(b)

    assert list(users(path)) == ["user@acme.com"]


def test_rule2_saas_users_sharing_a_key_are_one_user(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username="Ann@acme.com").subscription("s1", "Microsoft 365 E3")
    b.saas_user("s2", username="ann@ACME.com ").subscription("s2", "Visio Plan 2")
    path = build_and_run(b)

    found = users(path)
    assert list(found) == ["ann@acme.com"]
    assert found["ann@acme.com"]["licenses"] == "Microsoft 365 E3, Visio Plan 2"
    assert summary(path) == {"Acme": (1, 1)}


# ------------------------------------------------------------------------------------------
# Rule 3: the organization of a user
# ------------------------------------------------------------------------------------------

def test_rule3_backup_account_decides_the_organization(b: RawBuilder) -> None:
    org(b, "o1", "Alpha", "alpha.com")
    org(b, "o2", "Beta", "beta.com")
    mailbox(b, "o1", "x@beta.com", licensed=None)   # the account is in Alpha, the domain is Beta's
    b.person("x@beta.com", "Microsoft 365 E3")
    path = build_and_run(b)

    x = users(path)["x@beta.com"]
    assert (x["organization_name"], x["organization_source"]) == ("Alpha", "backup_account")
    assert summary(path) == {"Alpha": (1, 1), "Beta": (0, 0)}


def _tenant_domain(b):
    org(b, "o1", "Acme", "acme.com")


def _tenant_domain_other_case(b):
    org(b, "o1", "Acme", "ACME.Com")


def _licensed_account_domain(b):
    org(b, "o1", "Acme", "acme.com")
    mailbox(b, "o1", "a@acme-mail.com", licensed=True)


def _unlicensed_account_domain(b):
    org(b, "o1", "Acme", "acme.com")
    mailbox(b, "o1", "a@Acme-Mail.com", licensed=None)


def _two_owners_one_organization(b):
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Acme", "acme.com")


@pytest.mark.parametrize("setup, upn", [
    (_tenant_domain, "s@acme.com"),
    (_tenant_domain_other_case, "S@acme.COM"),
    (_licensed_account_domain, "s@acme-mail.com"),
    (_unlicensed_account_domain, "s@ACME-mail.com"),
    (_two_owners_one_organization, "s@acme.com"),
], ids=["tenant-domain", "case-insensitive", "licensed-account-upn-domain", "unlicensed-account-upn-domain",
        "two-owners-same-organization"])
def test_rule3_domain_with_exactly_one_owner_assigns(b: RawBuilder, setup: Callable, upn: str) -> None:
    setup(b)
    org(b, "o9", "Other", "other.com")
    b.person(upn, "Microsoft 365 E3")
    path = build_and_run(b)

    user = users(path)[upn.strip().lower()]
    assert (user["organization_name"], user["organization_source"], user["published"]) == ("Acme", "domain", True)
    assert summary(path)["Other"] == (0, 0)


def _two_tenants_share_the_domain(b):
    org(b, "o1", "Acme", "shared.com")
    org(b, "o2", "Other", "shared.com")


def _case_variant_names_share_the_domain(b):
    org(b, "o1", "Acme", "shared.com")
    org(b, "o2", "ACME", "Shared.com")


def _tenant_and_another_orgs_account(b):
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Other", "other.com")
    mailbox(b, "o2", "x@shared.com", licensed=None)
    b.tenant("o1", "o1-t1", "shared.com")


def _nobody_owns_the_domain(b):
    org(b, "o1", "Acme", "acme.com")


@pytest.mark.parametrize("setup", [
    _two_tenants_share_the_domain, _case_variant_names_share_the_domain, _tenant_and_another_orgs_account,
    _nobody_owns_the_domain,
], ids=["two-tenants", "case-variant-names-are-two-orgs", "tenant-vs-account-upn-domain", "no-owner"])
def test_rule3_ambiguous_domain_leaves_user_unassigned(b: RawBuilder, setup: Callable) -> None:
    setup(b)
    b.person("s@shared.com", "Microsoft 365 E3")
    path = build_and_run(b)

    user = users(path)["s@shared.com"]
    assert (user["organization_name"], user["organization_source"]) == (None, None)
    assert (user["m365_licensed"], user["published"]) == (True, False)
    assert set(summary(path).values()) == {(0, 0)}  # nobody else is licensed: nobody is counted


@pytest.mark.parametrize("tenant_domain, upn", [
    ("acme.com", "s@eu.acme.com"),
    ("eu.acme.com", "s@acme.com"),
    ("acme.com", "s@acme.com.evil"),
    ("acme.com", "s@xacme.com"),
])
def test_rule3_subdomain_is_another_domain(b: RawBuilder, tenant_domain: str, upn: str) -> None:
    org(b, "o1", "Acme", tenant_domain)
    b.person(upn, "Microsoft 365 E3")
    path = build_and_run(b)

    assert users(path)[upn]["organization_name"] is None
    assert summary(path) == {"Acme": (0, 0)}


@pytest.mark.parametrize("orgs, upn, expected", [
    ([("Alpha", "alpha.com"), ("Zed", "x.com")], "u@x.com", "Zed"),          # the domain owner, not the first
    ([("Alpha", "alpha.com"), ("Zed", "zed.com")], "u@X.com", "Alpha"),     # nobody's tenant domain: first
    ([("b", "b.com"), ("Z", "z.com"), ("Ä", "ae.com")], "u@none.org", "b"),  # rule 9: b < Z < Ä
    ([("b", "x.com"), ("B", "x.com")], "u@x.com", "B"),                     # both own it: first, "B" < "b"
    ([("Ä", "ae.com"), ("a", "a.com"), ("Zed", "zed.com")], "u@ae.com", "Ä"),
], ids=["domain-owner", "first-by-name", "rule9-not-binary", "rule9-case-tie", "domain-owner-last-by-name"])
def test_rule3_upn_in_several_orgs_goes_to_domain_owner_else_first_by_name(
        b: RawBuilder, orgs: list[tuple[str, str]], upn: str, expected: str) -> None:
    for i, (name, domain) in enumerate(orgs):
        org(b, f"o{i}", name, domain)
        mailbox(b, f"o{i}", upn, licensed=True)
    path = build_and_run(b)

    user = users(path)[upn.lower()]
    assert (user["organization_name"], user["organization_source"]) == (expected, "backup_account")
    assert summary(path) == {name: (1, 1) if name == expected else (0, 0) for name, _ in orgs}


def test_rule3_domain_owner_among_several_orgs_is_any_tenant_of_the_org(b: RawBuilder) -> None:
    """The org "has an m365 tenant whose domain equals the UPN's domain" even when the UPN's
    account sits in another of its tenants (or under another owner of the same name)."""
    org(b, "o1", "Alpha", "alpha.com")
    mailbox(b, "o1", "u@x.com", licensed=True)
    org(b, "o2", "Zed", "zed.com", "x.com")
    mailbox(b, "o2", "u@x.com", tenant=0, licensed=True)     # in zed.com; Zed's x.com tenant owns the domain
    org(b, "o3", "Alpha", "alpha.org")
    org(b, "o4", "Yak", "yak.com")
    org(b, "o5", "Yak", "y.com")                             # same org name as o4: Yak owns y.com
    mailbox(b, "o1", "v@y.com", licensed=True)
    mailbox(b, "o4", "v@y.com", licensed=True)
    path = build_and_run(b)

    found = users(path)
    assert {k: found[k]["organization_name"] for k in ("u@x.com", "v@y.com")} == {"u@x.com": "Zed", "v@y.com": "Yak"}


# ------------------------------------------------------------------------------------------
# Rule 4: license names and M365 licenses
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vendor, is_m365", [
    ("Microsoft Corporation", True), ("microsoft", True), ("MICROSOFT CORP", True),
    ("Contoso, a Microsoft reseller", True),
    ("Google LLC", False), ("Microsft", False), ("", False), (None, False),
])
def test_rule4_vendor_containing_microsoft_makes_an_m365_license(b: RawBuilder, vendor, is_m365: bool) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username="u@acme.com").subscription("s1", "Visio Plan 2", vendor=vendor)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["licenses"], user["published"]) == (
        is_m365, "Visio Plan 2" if is_m365 else "", is_m365)
    a = assignments(path, "u@acme.com")["Visio Plan 2"]
    assert (a["is_m365_license"], a["vendor"] or "") == (is_m365, vendor or "")  # null may be shown as ""
    decided_by = rule(path, a["m365_rule"])
    assert decided_by is not None and decided_by["applies_to"] == "m365"
    if not is_m365:
        assert (decided_by["effect"], decided_by["field"]) == ("require", "vendor")


@pytest.mark.parametrize("name", [
    "Microsoft 365 Business Premium Trial", "Power BI (free)", "POWER AUTOMATE FREE", "Microsoft 365 E5 trial",
    "Microsoft Teams Exploratory", "Microsoft Freeform Suite",
])
def test_rule4_free_trial_exploratory_are_not_m365_licenses(b: RawBuilder, name: str) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", name)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"], user["licenses"], user["published"]) == (
        False, False, "", False)
    a = assignments(path, "u@acme.com")[name]
    assert (a["is_m365_license"], a["is_email_license"]) == (False, False)
    decided_by = rule(path, a["m365_rule"])
    assert (decided_by["applies_to"], decided_by["effect"]) == ("m365", "exclude")
    assert decided_by["pattern"].lower() in name.lower()
    assert summary(path) == {"Acme": (0, 0)}


@pytest.mark.parametrize("application_name, name, expected", [
    (None, "Office 365 E3", "Office 365 E3"),
    ("", "Office 365 E3", "Office 365 E3"),
    ("Exchange Online Kiosk", "EXCHANGESTANDARD", "Exchange Online Kiosk"),
], ids=["null", "empty", "application-name-wins"])
def test_rule4_license_name_is_application_name_else_name(b: RawBuilder, application_name, name, expected) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username="u@acme.com").subscription("s1", application_name, name=name)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["licenses"], user["has_email_license"]) == (expected, True)
    assert list(assignments(path, "u@acme.com")) == [expected]


def test_rule4_subscriptions_join_on_the_saas_user_id(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.saas_user("s1", username="u@acme.com").subscription("s1", "Visio Plan 2")
    b.subscription("ghost", "Microsoft 365 E3")      # no such user
    b.subscription("u@acme.com", "Office 365 E1")    # a UPN is not a user id
    path = build_and_run(b)

    assert users(path)["u@acme.com"]["licenses"] == "Visio Plan 2"
    assert [r[0] for r in query(path, "SELECT license_name FROM core.license_assignments")] == ["Visio Plan 2"]


# ------------------------------------------------------------------------------------------
# Rule 5: email (ES) licenses
# ------------------------------------------------------------------------------------------

# Rule 5's patterns as docs/RULES.md states them: the expectation that license_rules.csv is checked against.
DOC_INCLUDE_PATTERNS = [
    "Microsoft 365 Business*", "Microsoft 365 E*", "Microsoft 365 F*", "Office 365 E*", "Office 365 F*",
    "Exchange Online (Plan*", "Exchange Online Kiosk", "Exchange Online Essentials",
]
DOC_EXCLUDE_PATTERNS = ["Archiving", "Protection"]

INCLUDE_EXAMPLES = [  # (pattern, license name): the examples of docs/RULES.md, rule 5, plus case variants
    ("Microsoft 365 Business*", "Microsoft 365 Business Basic"),
    ("Microsoft 365 Business*", "Microsoft 365 Business Standard"),
    ("Microsoft 365 Business*", "Microsoft 365 Business Premium"),
    ("Microsoft 365 Business*", "microsoft 365 BUSINESS premium"),
    ("Microsoft 365 E*", "Microsoft 365 E3"),
    ("Microsoft 365 E*", "Microsoft 365 E5"),
    ("Microsoft 365 F*", "Microsoft 365 F1"),
    ("Microsoft 365 F*", "Microsoft 365 F3"),
    ("Office 365 E*", "Office 365 E1"),
    ("Office 365 E*", "Office 365 E3"),
    ("Office 365 E*", "Office 365 E5"),
    ("Office 365 E*", "OFFICE 365 e3"),
    ("Office 365 F*", "Office 365 F3"),
    ("Exchange Online (Plan*", "Exchange Online (Plan 1)"),
    ("Exchange Online (Plan*", "Exchange Online (Plan 2)"),
    ("Exchange Online (Plan*", "exchange online (plan 2)"),
    ("Exchange Online Kiosk", "Exchange Online Kiosk"),
    ("Exchange Online Kiosk", "EXCHANGE ONLINE KIOSK"),
    ("Exchange Online Essentials", "Exchange Online Essentials"),
    ("Exchange Online Essentials", "exchange online essentials"),
]


def test_rule5_rules_are_loaded_from_the_package_data_file(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    path = build_and_run(b)

    columns = ["rule_id", "applies_to", "effect", "field", "match", "pattern", "description"]
    text = resources.files("m365_pipeline").joinpath(RULES_FILE).read_text(encoding="utf-8")
    in_file = {tuple(row[c].strip() for c in columns) for row in csv.DictReader(text.splitlines())}
    in_table = set(query(path, f"SELECT {', '.join(columns)} FROM core.license_rules"))
    assert in_table == in_file

    def patterns(applies_to, effect, field, match):
        return [r["pattern"] for r in dicts(path, "SELECT pattern FROM core.license_rules WHERE applies_to = ? "
                                            "AND effect = ? AND field = ? AND match = ?",
                                            [applies_to, effect, field, match])]
    assert sorted(patterns("email", "include", "license_name", "glob")) == sorted(DOC_INCLUDE_PATTERNS)
    assert sorted(patterns("email", "exclude", "license_name", "contains")) == sorted(DOC_EXCLUDE_PATTERNS)
    assert [p.lower() for p in patterns("m365", "require", "vendor", "contains")] == ["microsoft"]
    assert sorted(p.lower() for p in patterns("m365", "exclude", "license_name", "contains")) == [
        "exploratory", "free", "trial"]


def test_rule5_every_doc_pattern_has_an_example_here() -> None:
    assert {p for p, _ in INCLUDE_EXAMPLES} == set(DOC_INCLUDE_PATTERNS)


@pytest.mark.parametrize("pattern, name", INCLUDE_EXAMPLES, ids=[n for _, n in INCLUDE_EXAMPLES])
def test_rule5_each_include_pattern(b: RawBuilder, pattern: str, name: str) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", name)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"], user["licenses"]) == (True, True, name)
    a = assignments(path, "u@acme.com")[name]
    assert (a["is_m365_license"], a["is_email_license"]) == (True, True)
    decided_by = rule(path, a["email_rule"])
    assert (decided_by["applies_to"], decided_by["effect"], decided_by["pattern"]) == ("email", "include", pattern)
    assert summary(path) == {"Acme": (1, 1)}


@pytest.mark.parametrize("name", [
    "Microsoft 365 Apps for business",     # "Business" must follow "Microsoft 365 " directly
    "Microsoft 365 Apps for enterprise",
    "Legacy Microsoft 365 E3",             # a glob matches the whole name, not a part of it
    "Exchange Online Plan 1",              # the pattern has a literal "("
    "Exchange Online Kiosk Add-on",        # no "*": the whole name
    "Visio Plan 2",
    "Power BI Pro",
])
def test_rule5_m365_licenses_matching_no_include_pattern_are_not_email(b: RawBuilder, name: str) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", name)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"], user["published"]) == (True, False, True)
    a = assignments(path, "u@acme.com")[name]
    assert (a["is_m365_license"], a["is_email_license"]) == (True, False)
    decided_by = rule(path, a["email_rule"])
    assert decided_by is None or decided_by["effect"] != "include"
    assert summary(path) == {"Acme": (0, 1)}


@pytest.mark.parametrize("exclusion, name", [
    ("Archiving", "Exchange Online Archiving"),
    ("Archiving", "Microsoft 365 E3 Archiving Add-on"),
    ("Archiving", "Exchange Online (Plan 1) with ARCHIVING"),
    ("Protection", "Exchange Online Protection"),
    ("Protection", "Microsoft 365 E5 Information Protection and Governance"),
    ("Protection", "office 365 e5 threat protection"),
])
def test_rule5_each_exclusion(b: RawBuilder, exclusion: str, name: str) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", name)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"], user["published"]) == (True, False, True)
    a = assignments(path, "u@acme.com")[name]
    assert (a["is_m365_license"], a["is_email_license"]) == (True, False)
    if any(name.lower().startswith(p.rstrip("*").lower()) for p in DOC_INCLUDE_PATTERNS):
        decided_by = rule(path, a["email_rule"])
        assert (decided_by["applies_to"], decided_by["effect"], decided_by["pattern"]) == (
            "email", "exclude", exclusion)
    assert summary(path) == {"Acme": (0, 1)}


@pytest.mark.parametrize("name, vendor", [
    ("Microsoft 365 E3", "Contoso Reseller"),
    ("Microsoft 365 Business Premium Trial", MICROSOFT),
    ("Exchange Online (Plan 1) Free", MICROSOFT),
])
def test_rule5_an_email_license_must_be_an_m365_license(b: RawBuilder, name: str, vendor: str) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", name, vendor=vendor)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"]) == (False, False)
    assert assignments(path, "u@acme.com")[name]["is_email_license"] is False
    assert summary(path) == {"Acme": (0, 0)}


# ------------------------------------------------------------------------------------------
# Rule 6: per-user licenses and flags
# ------------------------------------------------------------------------------------------

def test_rule6_licenses_distinct_case_insensitive_first_spelling_sorted(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("ann@acme.com", "Visio Plan 2", "Microsoft 365 E3", "microsoft 365 e3", "MICROSOFT 365 E3",
             "Microsoft 365 E3", "Exchange Online (Plan 1)", "Power BI (free)")
    b.subscription(b.rows["raw.saas_users"][-1]["id"], "Zoom Pro", vendor="Zoom Video")
    b.person("bob@acme.com", "Zoom Pro", vendor="Zoom Video")
    path = build_and_run(b)

    found = users(path)
    assert found["ann@acme.com"]["licenses"] == "Exchange Online (Plan 1), MICROSOFT 365 E3, Visio Plan 2"
    assert found["bob@acme.com"]["licenses"] == ""
    ann = assignments(path, "ann@acme.com")
    assert sorted(ann, key=rule9) == ["Exchange Online (Plan 1)", "MICROSOFT 365 E3", "Power BI (free)",
                                      "Visio Plan 2", "Zoom Pro"]


def _accounts(*specs):
    """Rule-2 and other accounts of u@acme.com: (mailbox, licensed) per tenant."""
    def setup(b):
        for i, (is_mailbox, licensed) in enumerate(specs):
            mailbox(b, "o1", "u@acme.com", tenant=i, mailbox=is_mailbox, licensed=licensed)
    return setup


NO_SAAS = object()


@pytest.mark.parametrize("accounts, saas, expected", [
    ((), [("Microsoft 365 E3", MICROSOFT)], (True, True, "saas", True, False)),
    (((True, True),), NO_SAAS, (True, True, "backup", False, True)),
    (((True, None),), NO_SAAS, (False, False, "backup", False, True)),
    (((True, False),), NO_SAAS, (False, False, "backup", False, True)),
    (((True, None), (True, True)), NO_SAAS, (True, True, "backup", False, True)),
    (((True, None), (False, True)), NO_SAAS, (False, False, "backup", False, True)),
    (((True, True),), [], (False, False, "saas", True, True)),
    (((True, True),), [("Zoom Pro", "Zoom Video")], (False, False, "saas", True, True)),
    (((True, True),), [("Visio Plan 2", MICROSOFT)], (True, False, "saas", True, True)),
    (((True, None),), [("Office 365 E3", MICROSOFT)], (True, True, "saas", True, True)),
], ids=["saas-only", "b-licensed", "b-null", "b-false", "b-one-of-two-licensed", "b-only-public-folder-licensed",
        "saas-zero-licenses", "saas-non-m365-only", "saas-m365-not-email", "saas-email-b-unlicensed"])
def test_rule6_backup_stands_in_only_when_saas_does_not_know_the_user(b: RawBuilder, accounts, saas, expected) -> None:
    org(b, "o1", "Acme", "acme.com", "acme.net", "acme.org")
    _accounts(*accounts)(b)
    if saas is not NO_SAAS:
        b.saas_user("s1", username="U@acme.com")
        for license_name, vendor in saas:
            b.subscription("s1", license_name, vendor=vendor)
    path = build_and_run(b)

    user = users(path)["u@acme.com"]
    assert (user["m365_licensed"], user["has_email_license"], user["classification_source"],
            user["known_to_saas"], user["known_to_backup"]) == expected
    if saas is NO_SAAS:
        assert user["licenses"] == ""
    es, m365 = expected[1], expected[0]
    assert summary(path) == {"Acme": (int(es), int(m365))}


# ------------------------------------------------------------------------------------------
# Rule 7: published users and display names
# ------------------------------------------------------------------------------------------

UPN = "Jane.Doe@Acme.com"
KEY = "jane.doe@acme.com"


@pytest.mark.parametrize("saas_display, b_names, expected", [
    ("  Jane Doe  ", [("Other Name", "mailbox")], "Jane Doe"),
    ("", [("  Zed ", "mailbox"), ("bob", "mailbox"), ("Bob", "mailbox")], "Bob"),
    ("   ", [("b", "mailbox"), ("Z", "mailbox")], "b"),
    (None, [(None, "mailbox"), ("  ", "mailbox"), ("Ann", "mailbox")], "Ann"),
    (None, [], KEY),
    (NO_SAAS, [(" Ann B ", "mailbox")], "Ann B"),
    (NO_SAAS, [(None, "mailbox"), (" ", "mailbox")], KEY),
    (None, [("Aaa Folder", "public"), ("Aaa Gws", "gws"), ("Zoe", "mailbox")], "Zoe"),
    (None, [("Aaa Folder", "public"), ("Aaa Gws", "gws")], KEY),
], ids=["saas-trimmed", "smallest-b-rule9", "smallest-b-not-binary", "skips-empty-b", "key",
        "b-only", "b-only-key", "not-public-or-gws", "only-public-or-gws-key"])
def test_rule7_display_name_fallbacks(b: RawBuilder, saas_display, b_names, expected: str) -> None:
    org(b, "o1", "Acme", "acme.com", "acme.net", "acme.org")
    b.tenant("o1", "o1-gws", "acme-g.com", type="gws")
    for i, (name, kind) in enumerate(b_names):
        if kind == "gws":
            b.account("o1", "o1-gws", UPN, name=name, licensed=True, type="gws")
        else:
            mailbox(b, "o1", UPN, tenant=i % 3, name=name, mailbox=(kind == "mailbox"), licensed=True)
    if saas_display is not NO_SAAS:
        b.person(UPN, "Microsoft 365 E3", display_name=saas_display)
    path = build_and_run(b)

    assert users(path)[KEY]["display_name"] == expected


def test_rule7_unassigned_or_unlicensed_users_are_not_published(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("lic@acme.com", "Microsoft 365 E3")
    b.person("unlic@acme.com", "Zoom Pro", vendor="Zoom Video")
    mailbox(b, "o1", "bunl@acme.com", licensed=None)
    b.person("far@nowhere.com", "Microsoft 365 E3")
    path = build_and_run(b)

    found = users(path)
    assert {k: u["published"] for k, u in found.items()} == {
        "lic@acme.com": True, "unlic@acme.com": False, "bunl@acme.com": False, "far@nowhere.com": False}
    for u in found.values():
        assert u["published"] == (u["organization_name"] is not None and u["m365_licensed"])
    assert summary(path) == {"Acme": (1, 1)}


# ------------------------------------------------------------------------------------------
# Rule 8: the summary
# ------------------------------------------------------------------------------------------

def test_rule8_counts_and_totals(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Acme", "acme.org")
    org(b, "o3", "Beta", "beta.com")
    org(b, "o4", "Empty")
    b.person("a1@acme.com", "Microsoft 365 E3")                                   # ES
    b.person("a2@acme.com", "Visio Plan 2")                                       # M365 only
    b.person("a3@acme.org", "Exchange Online (Plan 1)", "Exchange Online Archiving")  # ES
    mailbox(b, "o1", "a4@acme.com", licensed=True)                                # ES (B stands in)
    mailbox(b, "o1", "a5@acme.com", licensed=None)                                # nothing
    b.person("a6@acme.com", "Exchange Online Archiving")                          # M365 only
    b.person("a7@acme.com", "Zoom Pro", vendor="Zoom Video")                      # nothing
    b.person("b1@beta.com", "Office 365 F3")                                      # ES
    b.person("b2@beta.com", "Power BI Pro")                                       # M365 only
    b.person("b3@beta.com", "Microsoft 365 E5 Trial")                             # nothing
    b.person("u@nowhere.com", "Microsoft 365 E3")                                 # unassigned
    path = build_and_run(b)

    found = summary(path)
    assert found == {"Acme": (3, 5), "Beta": (1, 2), "Empty": (0, 0)}
    assert (len(found), sum(es for es, _ in found.values()), sum(m for _, m in found.values())) == (3, 4, 7)
    published = query(path, "SELECT organization_name, count(*) FILTER (has_email_license), count(*) "
                            "FROM core.users WHERE published GROUP BY ALL")
    assert {o: (es, m) for o, es, m in published} == {o: c for o, c in found.items() if c != (0, 0)}


# ------------------------------------------------------------------------------------------
# Rule 9: ordering
# ------------------------------------------------------------------------------------------

TRICKY = ["b", "B", "a", "Ä", "ä", "Z", "A", "_x", "é"]


def test_rule9_duckdb_order_by_lower_then_value_is_pythons_order() -> None:
    with duckdb.connect() as conn:
        got = [r[0] for r in conn.execute(
            "SELECT x FROM unnest(?::VARCHAR[]) AS t(x) ORDER BY lower(x), x", [TRICKY]).fetchall()]
    assert got == sorted(TRICKY, key=rule9)


def test_rule9_ordering_of_licenses(b: RawBuilder) -> None:
    org(b, "o1", "Acme", "acme.com")
    b.person("u@acme.com", "b", "B", "a", "Ä", "ä", "Z")
    path = build_and_run(b)

    # "B" and "b" are one license spelled "B" (("b","B") < ("b","b")); likewise "Ä" before "ä".
    assert users(path)["u@acme.com"]["licenses"] == "a, B, Z, Ä"
    assert sorted(assignments(path, "u@acme.com"), key=rule9) == ["a", "B", "Z", "Ä"]


def test_rule9_org_summary_rows_are_in_rule9_order(b: RawBuilder) -> None:
    names = ["b", "B", "a", "Ä", "Z", "é"]
    for i, name in enumerate(names):
        org(b, f"o{i}", name)
    path = build_and_run(b)

    assert [r[0] for r in query(path, "SELECT organization_name FROM marts.org_summary")] == sorted(names, key=rule9)


# ------------------------------------------------------------------------------------------
# Rule 10: last_collected and the history
# ------------------------------------------------------------------------------------------

def at(day: int, hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2026, 1, day, hh, mm, ss, tzinfo=UTC)


@pytest.mark.parametrize("saas_rows", [True, False], ids=["both-sources", "saas-tables-empty"])
def test_rule10_last_collected_is_when_pulls_started(b: RawBuilder, saas_rows: bool) -> None:
    org(b, "o1", "Acme", "acme.com")
    org(b, "o2", "Beta")
    mailbox(b, "o1", "a@acme.com", licensed=True)
    if saas_rows:
        b.person("s@acme.com", "Microsoft 365 E3")
    b.collected("raw.saas_users", at(21, 22, 59, 58))
    b.collected("raw.saas_user_subscriptions", at(21, 23, 4, 0))
    b.collected("raw.backup_organizations", at(21, 23, 0, 1))
    b.collected("raw.backup_tenants", at(21, 23, 0, 7))
    b.collected("raw.backup_accounts", at(21, 23, 1, 30))
    path = build_and_run(b)

    expected = at(21, 22, 59, 58) if saas_rows else at(21, 23, 0, 1)
    assert {r[0] for r in query(path, "SELECT last_collected FROM marts.org_summary")} == {expected}
    types = dict(query(path, "SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = 'marts' AND table_name = 'org_summary'"))
    assert types["last_collected"] == "TIMESTAMP WITH TIME ZONE"


@pytest.fixture
def far_east_session_time_zone(monkeypatch: pytest.MonkeyPatch):
    """Run DuckDB sessions in UTC+9, so a date taken in the session's zone is a day late at 23:30 UTC."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _history(path: Path) -> dict[date, set[tuple]]:
    found: dict[date, set[tuple]] = {}
    for day, *rest in query(path, "SELECT collection_date, organization_name, es_user_count, "
                                  "m365_licensed_user_count, last_collected FROM marts.org_summary_history"):
        found.setdefault(day, set()).add(tuple(rest))
    return found


def test_rule10_history_keeps_one_row_set_per_date_and_a_rerun_replaces_the_day(
        tmp_path: Path, far_east_session_time_zone) -> None:
    path = tmp_path / "data" / "m365.duckdb"

    first = RawBuilder(path, collected_at=at(21, 23, 30))
    org(first, "o1", "Acme", "acme.com")
    org(first, "o2", "Gone", "gone.com")
    mailbox(first, "o1", "a@acme.com").account("o1", "o1-t0", "b@acme.com")
    mailbox(first, "o2", "g@gone.com")
    build_and_publish(first)
    assert _history(path) == {date(2026, 1, 21): {("Acme", 2, 2, at(21, 23, 30)), ("Gone", 1, 1, at(21, 23, 30))}}

    rerun = RawBuilder(path, collected_at=at(21, 23, 45))   # the same day, again
    org(rerun, "o1", "Acme", "acme.com")
    org(rerun, "o3", "New")
    mailbox(rerun, "o1", "a@acme.com")
    build_and_publish(rerun)
    assert _history(path) == {date(2026, 1, 21): {("Acme", 1, 1, at(21, 23, 45)), ("New", 0, 0, at(21, 23, 45))}}

    next_day = RawBuilder(path, collected_at=at(22, 23, 10))
    org(next_day, "o1", "Acme", "acme.com")
    for n in range(3):
        mailbox(next_day, "o1", f"u{n}@acme.com")
    build_and_publish(next_day)
    assert _history(path) == {
        date(2026, 1, 21): {("Acme", 1, 1, at(21, 23, 45)), ("New", 0, 0, at(21, 23, 45))},
        date(2026, 1, 22): {("Acme", 3, 3, at(22, 23, 10))},
    }
    assert summary(path) == {"Acme": (3, 3)}
    types = dict(query(path, "SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = 'marts' AND table_name = 'org_summary_history'"))
    assert types["collection_date"] == "DATE"
