"""The simulator's nights (``SimulatorConfig.night`` / ``m365-simulate --night``): the served data
evolves deterministically, so that consecutive nights exercise every rule-12 change kind. Read
through the ground truth (which reads only what the APIs serve) and, for the organizations, the
served owner records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

from m365_pipeline.simulator import FaultConfig, SimulatorConfig, ground_truth
from m365_pipeline.simulator.dataset import ARRIVAL_NIGHT, DEPARTURE_NIGHT, MOVE_NIGHT, Dataset

from .helpers import expected_changes

ORGS, USERS, SEED = 10, 12, 7


def config(night: int) -> SimulatorConfig:
    return SimulatorConfig(orgs=ORGS, users_per_org=USERS, seed=SEED, night=night, faults=FaultConfig())


def published(night: int) -> dict[str, dict]:
    truth = ground_truth(config(night))
    return {u["user_principal_name"]: {**u, "organization_name": org}
            for org, users in truth["users"].items() for u in users}


def served(night: int) -> tuple[list, list, list]:
    ds = Dataset(config(night))
    owners = list(ds.backup_owners())
    tenants = [t for o in owners for t in ds.backup_tenants(o["id"])]
    accounts = [a for o in owners for t in ds.backup_tenants(o["id"]) for a in ds.backup_accounts(o["id"], t["id"])]
    return owners, tenants, [*ds.saas_users(), *accounts]


def test_night_zero_is_the_base_data_and_every_night_is_the_same_in_every_process():
    base = SimulatorConfig(orgs=ORGS, users_per_org=USERS, seed=SEED, faults=FaultConfig())
    assert served(0) == served(0) and ground_truth(config(0)) == ground_truth(base)
    code = ("import json; from m365_pipeline.simulator import SimulatorConfig, ground_truth; "
            f"print(json.dumps(ground_truth(SimulatorConfig(orgs={ORGS}, users_per_org={USERS}, seed={SEED}, "
            "night=9))))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(other.stdout) == json.loads(json.dumps(ground_truth(config(9))))
    assert served(9) != served(0)


@pytest.mark.parametrize(("a", "b", "kinds"), [
    (0, 1, {"removed", "licenses_changed"}),
    (MOVE_NIGHT - 1, MOVE_NIGHT, {"moved", "licenses_changed"}),
    (0, DEPARTURE_NIGHT, {"added", "removed", "moved", "email_gained", "email_lost", "licenses_changed"}),
])
def test_consecutive_nights_bring_hires_leavers_license_changes_and_moves(a, b, kinds):
    found = Counter(row["change"] for row in expected_changes(published(a), published(b)))
    assert kinds <= set(found), found
    if b - a == 1:  # one night changes a few users, not the data set
        assert sum(found.values()) < len(published(b)) // 5, found


def test_a_customer_arrives_and_one_leaves_on_their_nights():
    def names(night: int) -> set[str]:
        return {o["organization_name"] for o in served(night)[0]}

    assert names(ARRIVAL_NIGHT - 1) == names(0)
    arrived = names(ARRIVAL_NIGHT) - names(0)
    assert len(arrived) == 1 and names(ARRIVAL_NIGHT) >= names(0)
    (newcomer,) = arrived
    assert published_org_size(ARRIVAL_NIGHT, newcomer) > 0
    left = names(0) - names(DEPARTURE_NIGHT)
    assert len(left) == 1 and names(DEPARTURE_NIGHT) == (names(0) | arrived) - left
    gone = next(iter(left))
    assert not any(u["organization_name"] == gone for u in published(DEPARTURE_NIGHT).values())


def published_org_size(night: int, org: str) -> int:
    return sum(u["organization_name"] == org for u in published(night).values())


def test_the_moved_tenants_users_keep_their_upn_and_change_organization():
    before, after = published(MOVE_NIGHT - 1), published(MOVE_NIGHT)
    moved = [upn for upn in before.keys() & after.keys()
             if before[upn]["organization_name"] != after[upn]["organization_name"]]
    assert moved
    assert len({(before[u]["organization_name"], after[u]["organization_name"]) for u in moved}) == 1


def test_the_cli_serves_the_chosen_night():
    proc = subprocess.run([sys.executable, "-m", "m365_pipeline.simulator.cli", "--orgs", str(ORGS),
                           "--users-per-org", str(USERS), "--seed", str(SEED), "--night", "4",
                           "--print-ground-truth"], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(proc.stdout) == json.loads(json.dumps(ground_truth(config(4))))
    bad = subprocess.run([sys.executable, "-m", "m365_pipeline.simulator.cli", "--night", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--night" in bad.stderr


def test_a_departed_customer_is_not_served_by_id_either():
    ds = Dataset(config(DEPARTURE_NIGHT))
    listed = {o.id for o in ds.listed_owners()}
    gone = [o for o in ds.owners if o.id not in listed]
    assert len(gone) == 1 and ds.owner(gone[0].id) is None


def test_the_bench_churn_divisor_spreads_the_changes_over_more_nights():
    """bench/nights.py's knob: a divisor of 1 is the served data; N changes about N times fewer users a night."""
    assert ground_truth(replace(config(5), churn_divisor=1)) == ground_truth(config(5))
    wide, divisor = SimulatorConfig(orgs=30, users_per_org=20, seed=SEED, faults=FaultConfig()), 4

    def changed(churn_divisor: int) -> int:
        nights = [ground_truth(replace(wide, night=n, churn_divisor=churn_divisor)) for n in range(1, 8)]
        flat = [{u["user_principal_name"]: {**u, "organization_name": org}
                 for org, users in truth["users"].items() for u in users} for truth in nights]
        return sum(len(expected_changes(a, b)) for a, b in zip(flat, flat[1:], strict=False))

    served, slowed = changed(1), changed(divisor)
    assert 0 < slowed < served / (divisor / 2), (served, slowed)
    with pytest.raises(ValueError, match="churn_divisor"):
        SimulatorConfig(churn_divisor=0)
