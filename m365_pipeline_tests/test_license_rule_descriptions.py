"""Each license rule's description is what an analyst reads for "why does this license count (or not)"
(README, Analysts): it must be true for every license the rule decides. Checked against every license
the simulator produces, with the rules' patterns applied in plain Python (docs/RULES.md, rules 4 and 5),
independently of the SQL.

Mechanically: a description names only licenses its rule matches, and a rule that decides a license's
email status (an email include or exclude, shown as ``core.license_assignments.email_rule``) names each
license it decides, so its reason is stated for that license and not for another product."""

from __future__ import annotations

import re

import pytest

from m365_pipeline.license_rules import LicenseRule, load_rules
from m365_pipeline.simulator.dataset import (
    ADDON_SKUS,
    EMAIL_SKUS,
    FREE_SKUS,
    M365_OTHER_SKUS,
    NON_MICROSOFT_APPS,
)

# Every license name the simulator produces, with whether rule 4 makes it an M365 license.
LICENSES = {name: True for name, _ in EMAIL_SKUS + M365_OTHER_SKUS + ADDON_SKUS}
LICENSES |= {name: False for name, _ in FREE_SKUS} | {name: False for name, _, _ in NON_MICROSOFT_APPS}
RULES = load_rules()


def matches(rule: LicenseRule, name: str) -> bool:
    if rule.match == "contains":
        return rule.pattern.lower() in name.lower()
    return re.fullmatch(".*".join(map(re.escape, rule.pattern.split("*"))), name, re.IGNORECASE) is not None


def named_in(description: str) -> set[str]:
    """Simulator license names written out in ``description`` (the longest, where one contains another)."""
    found = {name for name in LICENSES if name.lower() in description.lower()}
    return {name for name in found if not any(name != other and name.lower() in other.lower() for other in found)}


def email_rule_of(name: str) -> LicenseRule | None:
    """The rule shown as a license's email_rule: the first email exclude that hits, else the first include."""
    if not LICENSES[name]:
        return None
    email = [rule for rule in RULES if rule.applies_to == "email" and matches(rule, name)]
    excludes = [rule for rule in email if rule.effect == "exclude"]
    return (excludes or [rule for rule in email if rule.effect == "include"] or [None])[0]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.rule_id)
def test_a_rule_description_names_only_licenses_the_rule_matches(rule):
    for name in named_in(rule.description):
        assert matches(rule, name), f"{rule.rule_id}'s description names {name!r}, which it does not match"


@pytest.mark.parametrize("rule", [rule for rule in RULES if rule.applies_to == "email"], ids=lambda rule: rule.rule_id)
def test_an_email_rule_description_names_every_license_it_decides(rule):
    decided = {name for name in LICENSES if email_rule_of(name) == rule}
    assert decided, f"{rule.rule_id} decides no license the simulator produces"
    missing = decided - named_in(rule.description)
    assert not missing, f"{rule.rule_id}'s description {rule.description!r} is shown for {sorted(missing)} too"
