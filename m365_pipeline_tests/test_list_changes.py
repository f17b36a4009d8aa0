"""No user is lost while a vendor list changes under the pull (the simulator deletes a user mid-pull)."""

from __future__ import annotations

import pytest

from m365_pipeline.resources.http import Endpoint, VendorUnavailableError
from m365_pipeline.resources.paging import ListRead, read_until_consistent, saas_pages
from m365_pipeline.simulator import ground_truth

from .helpers import query, run_pipeline

SIZE = {"orgs": 5, "users_per_org": 8}


def _summary(published_db) -> list[tuple]:
    return query(published_db, """SELECT organization_name, es_user_count, m365_licensed_user_count
                                  FROM marts.org_summary ORDER BY lower(organization_name), organization_name""")


def _expected(truth) -> list[tuple]:
    return [(o["organization_name"], o["es_user_count"], o["m365_licensed_user_count"]) for o in truth["organizations"]]


@pytest.mark.slow
def test_a_user_deleted_after_page_1_shifts_later_pages_and_the_list_is_read_again_losing_no_one(
        start_simulator, tmp_path):
    sim = start_simulator(seed=11, delete_saas_user="after_first_page", **SIZE)
    data_dir = tmp_path / "data"
    result = run_pipeline(sim, data_dir, saas={"page_size": 7})  # several pages, so later ones shift
    assert sim.stats()["faults"].get("delete_saas_user") == 1
    truth = ground_truth(sim.dataset)  # the vendor as it is now: without the deleted user
    db = data_dir / "m365.duckdb"
    listed = {row[0] for row in query(db, "SELECT id FROM raw.saas_users")}
    assert listed == {user["id"] for user in sim.dataset.saas_users()}, "a user was skipped or the deleted one kept"
    assert query(db, "SELECT count(*) FROM raw.saas_users")[0][0] == len(listed)
    assert _summary(db) == _expected(truth)
    assert result.success


@pytest.mark.slow
def test_a_user_deleted_before_their_subscriptions_were_read_is_gone_with_a_warning_not_a_failed_night(
        start_simulator, tmp_path):
    sim = start_simulator(seed=12, delete_saas_user="after_last_page", **SIZE)
    data_dir = tmp_path / "data"
    result = run_pipeline(sim, data_dir, saas={"page_size": 7})
    assert result.success
    meta = result.asset_materializations_for_node("raw__saas_user_subscriptions")[0].metadata
    assert meta["deleted_during_pull"].value == 1
    truth = ground_truth(sim.dataset)
    db = data_dir / "m365.duckdb"
    assert _summary(db) == _expected(truth)
    assert query(db, "SELECT count(*) FROM core.users WHERE published")[0][0] == \
        sum(len(users) for users in truth["users"].values())


def _page(ids, total):
    return [{"id": i} for i in ids], total


@pytest.mark.parametrize(("pages", "problem"), [
    ([_page([1, 2], 4), _page([3, 4], 4)], None),
    ([_page([1, 2], 4), _page([4], 3)], "the total changed from 4 to 3 between pages"),  # a deletion shifted page 2
    ([_page([1, 2], 4), _page([2, 3], 4)], "1 records came twice"),  # an insertion shifted it back
    ([_page([1, 2], 3), _page([], 3)], "2 distinct records collected but the vendor reports 3"),
    ([_page([1, 2], None)], None),  # no total reported: only duplicates can be seen
])
def test_a_list_read_is_trusted_only_when_it_agrees_with_itself_and_the_vendor_total(pages, problem):
    listing = ListRead()
    for items, total in pages:
        listing.add(items, total)
    assert listing.problem() == problem


def test_a_list_that_keeps_changing_fails_clearly_after_the_last_read_and_a_settled_one_is_kept():
    reads, restarts, warnings = [], [], []
    responses = iter([[1, 2, 3], [1, 2, 3], [1, 2]])  # total drops to 2 during the first two reads

    def read_once(listing: ListRead) -> None:
        ids = next(responses)
        reads.append(ids)
        listing.add([{"id": i} for i in ids], 2)

    listing = read_until_consistent(read_once, lambda: restarts.append(1), warnings.append, "GET /users")
    assert listing.keys == {1, 2} and len(reads) == 3 and len(restarts) == 2
    assert "GET /users changed while it was paged (3 distinct records collected but the vendor reports 2)" \
        in warnings[0]

    def never_settles(listing: ListRead) -> None:
        listing.add([{"id": 1}], 2)

    with pytest.raises(VendorUnavailableError, match="GET /users kept changing while it was paged, 4 reads"):
        read_until_consistent(never_settles, lambda: None, lambda _: None, "GET /users")


def test_saas_pages_hand_each_page_and_its_total_to_the_list_read():
    bodies = {1: {"pagination": {"total_pages": 2, "total_items": 3}, "items": [{"id": "a"}, {"id": "b"}]},
              2: {"pagination": {"total_pages": 2, "total_items": 3}, "items": [{"id": "c"}]}}
    listing = ListRead()
    list(saas_pages(bodies.__getitem__, lambda n: Endpoint("S", "/users", n), listing))
    assert listing.keys == {"a", "b", "c"} and listing.totals == [3] and listing.problem() is None
