"""The whole raw -> core -> marts graph against the simulator's independently computed ground truth."""

from __future__ import annotations

import pytest
from dagster import AssetKey, materialize

from m365_pipeline.assets.core import core_assets, core_checks
from m365_pipeline.assets.marts import marts_assets, marts_checks
from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.resources import PublishPolicy
from m365_pipeline.simulator import ground_truth

from .helpers import make_resources, query, run_pipeline

ALL_ASSETS = [*raw_assets, *core_assets, *marts_assets, *core_checks, *marts_checks]


def _materialize(resources, **kwargs):
    return materialize(ALL_ASSETS, resources={**resources, "publish_policy": kwargs.pop("policy", PublishPolicy())},
                       **kwargs)


def _summary(db_path):
    return query(db_path, """
        SELECT organization_name, es_user_count, m365_licensed_user_count FROM marts.org_summary
        ORDER BY lower(organization_name), organization_name""")


@pytest.mark.parametrize(("orgs", "users_per_org", "seed"), [
    pytest.param(50, 40, 42, marks=pytest.mark.slow),  # 2,000 users
    (20, 25, 9001),
])
def test_org_summary_matches_ground_truth_for_every_organization(start_simulator, db_path, orgs, users_per_org,
                                                                 seed):
    sim = start_simulator(orgs=orgs, users_per_org=users_per_org, seed=seed)
    _materialize(make_resources(sim, db_path), raise_on_error=True)
    truth = ground_truth(sim.dataset)
    expected = [(o["organization_name"], o["es_user_count"], o["m365_licensed_user_count"])
                for o in truth["organizations"]]
    assert _summary(db_path) == expected  # same organizations, same counts, same order (rule 9)

    published = query(db_path, """
        SELECT organization_name, user_principal_name, display_name, licenses, has_email_license
        FROM core.users WHERE published
        ORDER BY lower(organization_name), organization_name, lower(user_principal_name), user_principal_name""")
    expected_users = [
        (org, u["user_principal_name"], u["display_name"], u["licenses"], u["has_email_license"])
        for org in [o["organization_name"] for o in truth["organizations"]]
        for u in truth["users"].get(org, [])
    ]
    assert published == expected_users
    unassigned = query(db_path, "SELECT count(*) FROM core.users WHERE organization_name IS NULL")[0][0]
    assert unassigned == truth["unassigned_users"]


def _check_results(result):
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_warning_checks_report_unassigned_users_and_multi_org_upns(start_simulator, db_path):
    sim = start_simulator(orgs=8, users_per_org=10, seed=4)
    result = _materialize(make_resources(sim, db_path), raise_on_error=True)
    checks = _check_results(result)
    truth = ground_truth(sim.dataset)
    unassigned = checks["unassigned_users"]
    assert unassigned.passed is (truth["unassigned_users"] == 0)
    assert unassigned.metadata["unassigned_users"].value == truth["unassigned_users"]
    multi = checks["upn_in_several_organizations"]
    assert multi.metadata["upns"].value == len(truth["multi_org_upns"])
    assert checks["contract_invariants"].passed and checks["pull_is_plausible"].passed


def test_blocking_check_stops_a_broken_pull_before_the_downstream_asset(start_simulator, db_path):
    # The whole graph: only a published night is kept (rule 11), and the check compares with it.
    good = start_simulator(orgs=12, users_per_org=8, seed=5)
    run_pipeline(good, db_path.parent)
    history_before = query(db_path, "SELECT * FROM marts.org_summary_history ORDER BY ALL")
    nights_before = query(db_path, "SELECT * FROM marts.nights ORDER BY ALL")

    # The next night source B shows far fewer organizations: an outage masquerading as data.
    shrunk = start_simulator(orgs=3, users_per_org=8, seed=5)
    result = run_pipeline(shrunk, db_path.parent, raise_on_error=False)
    assert not result.success
    plausible = _check_results(result)["pull_is_plausible"]
    assert not plausible.passed and "organizations fell from" in plausible.description
    materialized = {e.asset_key for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert AssetKey(["marts", "org_summary"]) in materialized
    assert AssetKey(["marts", "org_summary_history"]) not in materialized
    assert query(db_path, "SELECT * FROM marts.org_summary_history ORDER BY ALL") == history_before
    assert query(db_path, "SELECT * FROM marts.nights ORDER BY ALL") == nights_before


def test_a_looser_publish_policy_lets_an_operator_publish_a_real_drop(start_simulator, db_path):
    run_pipeline(start_simulator(orgs=12, users_per_org=8, seed=5), db_path.parent)
    shrunk = start_simulator(orgs=3, users_per_org=8, seed=5)
    result = run_pipeline(shrunk, db_path.parent, policy=PublishPolicy(max_drop_fraction=1.0))
    assert result.success
