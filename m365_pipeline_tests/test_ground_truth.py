"""The simulator's ground truth: docs/RULES.md rules 1-10 on the fixed special cases, plus invariants."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m365_pipeline.simulator import Dataset, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import ACME_NAME, ADDON_SKUS, EMAIL_SKUS, M365_OTHER_SKUS, MUELLER_NAME

from .helpers import rule9

SMALL = SimulatorConfig(orgs=5, users_per_org=10, seed=1)
ACME_UPPER_NAME = ACME_NAME.upper()


@pytest.fixture(scope="module")
def truth() -> dict[str, Any]:
    return ground_truth(SMALL)


def published(truth: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """upn -> (organization, user), asserting that no user is published twice."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for org, users in truth["users"].items():
        for user in users:
            assert user["user_principal_name"] not in out
            out[user["user_principal_name"]] = (org, user)
    return out


def test_organizations_are_distinct_names_in_rule9_order_including_empty_ones(truth: dict[str, Any]) -> None:
    names = [o["organization_name"] for o in truth["organizations"]]
    assert len(names) == SMALL.orgs == truth["totals"]["total_organizations"]
    assert truth["raw_counts"]["backup_organizations"] == SMALL.orgs + 1  # the twin owner is merged
    assert names == sorted(names, key=rule9)
    assert {ACME_NAME, ACME_UPPER_NAME, MUELLER_NAME, MUELLER_NAME + " "} <= set(names)  # case, space: distinct
    counts = {o["organization_name"]: o["m365_licensed_user_count"] for o in truth["organizations"]}
    assert counts[MUELLER_NAME + " "] == 0 and sorted(counts.values())[:2] == [0, 0]
    assert list(truth["users"]) == names


def test_totals_are_sums_and_users_match_counts(truth: dict[str, Any]) -> None:
    orgs = truth["organizations"]
    assert truth["totals"]["total_es_users"] == sum(o["es_user_count"] for o in orgs)
    assert truth["totals"]["total_m365_licensed_users"] == sum(o["m365_licensed_user_count"] for o in orgs)
    for org in orgs:
        users = truth["users"][org["organization_name"]]
        assert len(users) == org["m365_licensed_user_count"]
        assert sum(u["has_email_license"] for u in users) == org["es_user_count"]
        upns = [u["user_principal_name"] for u in users]
        assert upns == sorted(upns, key=rule9)


def _all_m365_names() -> str:
    names = [n for n, _ in EMAIL_SKUS + M365_OTHER_SKUS + ADDON_SKUS]
    return ", ".join(sorted(names, key=rule9))


# upn -> (organization or None for "not published", display_name, licenses, has_email_license); None = any
EXPECTED: dict[str, tuple[str | None, str | None, str | None, bool | None]] = {
    "license.zoo@acme-widgets.example": (ACME_NAME, "License Zoo", _all_m365_names(), True),
    "case.dup@acme-widgets.example": (ACME_NAME, None, "Microsoft 365 Business Standard", True),
    "addons.only@acme-widgets.example": (
        ACME_NAME, None, ("Exchange Online Archiving for Exchange Online, Exchange Online Protection, "
                          "Microsoft 365 E5 Information Protection and Governance"), False),
    "free.only@acme-widgets.example": (None, None, None, None),  # B says licensed, S decides
    "non.email@acme-widgets.example": (
        ACME_NAME, None, "Microsoft 365 Apps for business, Microsoft Copilot, Microsoft Power BI Pro", False),
    "null.username@acme-widgets.example": (ACME_NAME, "Null Username", None, None),
    "empty.username@acme-widgets.example": (ACME_NAME, "Empty Username", "Exchange Online (Plan 1)", True),
    "display.from.b@acme-widgets.example": (ACME_NAME, "Zoë Ångström", None, None),
    "display.blank@acme-widgets.example": (ACME_NAME, "display.blank@acme-widgets.example", None, None),
    "sales@acme-widgets.example": (None, None, None, None),  # shared mailbox, no subscriptions
    "no.license@acme-widgets.example": (None, None, None, None),
    "solo.saas@acme-widgets.example": (ACME_NAME, "Solo Saas", "Microsoft 365 E3", True),  # by its domain
    "nobody.owns@freemail.example": (None, None, None, None),
    "two.owners@acme-labs.example": (None, None, None, None),
    "gws.only@acme-widgets-gws.example": (None, None, None, None),
    "sub.domain@eu.acme-widgets.example": (None, None, None, None),
    "pf.domain@acme-archive.example": (None, None, None, None),  # public folders own no domain
    "archive@acme-archive.example": (None, None, None, None),  # a licensed public folder is no user
    "dual.role@acme-labs.example": (ACME_NAME, "Dual Role", "Office 365 E3", True),  # smallest B name, any org
    "consultant@freelance-experts.example": (ACME_UPPER_NAME, None, None, True),  # first candidate by rule 9
    "shared.services@mueller-soehne.example": (MUELLER_NAME, "Shared Services", "Microsoft 365 E5", True),
    "backup.only@acme-labs.example": (ACME_NAME, "Backup Only", "", True),
    "backup.unlicensed@acme-labs.example": (None, None, None, None),
    "info@acme-labs.example": (None, None, None, None),
    "backup.noname@acme-labs.example": (ACME_NAME, "backup.noname@acme-labs.example", "", True),
    "backup.messy@acme-labs.example": (ACME_NAME, "Backup Messy", "", True),
}


@pytest.mark.parametrize("upn", EXPECTED)
def test_special_cases_follow_the_contract(truth: dict[str, Any], upn: str) -> None:
    org, display, licenses, has_email = EXPECTED[upn]
    users = published(truth)
    if org is None:
        assert upn not in users
        return
    assert users[upn][0] == org
    actual = users[upn][1]
    for field, value in (("display_name", display), ("licenses", licenses), ("has_email_license", has_email)):
        if value is not None:
            assert actual[field] == value, field


def test_multi_org_and_unassigned_users(truth: dict[str, Any]) -> None:
    assert truth["multi_org_upns"] == ["consultant@freelance-experts.example", "dual.role@acme-labs.example"]
    assert truth["unassigned_users"] == 5  # the five S-only users on domains owned by no or two orgs


def test_raw_counts_match_the_dataset_and_config_equals_dataset() -> None:
    ds = Dataset(SMALL)
    truth = ground_truth(ds)
    users = list(ds.saas_users())
    owners = list(ds.backup_owners())
    tenants = [(o["id"], t["id"]) for o in owners for t in ds.backup_tenants(o["id"])]
    assert truth["raw_counts"] == {
        "saas_users": len(users),
        "saas_user_subscriptions": sum(len(list(ds.saas_subscriptions(u["id"]))) for u in users),
        "backup_organizations": len(owners),
        "backup_tenants": len(tenants),
        "backup_accounts": sum(len(list(ds.backup_accounts(o, t))) for o, t in tenants),
    }
    assert truth == ground_truth(SMALL)
    assert truth != ground_truth(replace(SMALL, seed=2))


@settings(max_examples=25, deadline=None)
@given(orgs=st.integers(0, 9), users=st.integers(0, 14), seed=st.integers(-1000, 1000))
def test_invariants_hold_for_any_small_config(orgs: int, users: int, seed: int) -> None:
    truth = ground_truth(SimulatorConfig(orgs=orgs, users_per_org=users, seed=seed))
    assert truth["totals"]["total_organizations"] == orgs == len(truth["organizations"])
    for org in truth["organizations"]:
        assert 0 <= org["es_user_count"] <= org["m365_licensed_user_count"]
    for _, user in published(truth).values():
        upn = user["user_principal_name"]
        # trimmed of spaces only (as rule 7's SQL): a leading tab is the vendor's text
        assert upn == upn.strip().lower() and user["display_name"] == user["display_name"].strip(" ")
        names = user["licenses"].split(", ") if user["licenses"] else []
        assert names == sorted(names, key=rule9)
        assert len({n.lower() for n in names}) == len(names)
