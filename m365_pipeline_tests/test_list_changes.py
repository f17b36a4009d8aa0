"""No user is lost while a vendor list changes under the pull (the simulator deletes a user mid-pull)."""

from __future__ import annotations

import asyncio

import pytest

from m365_pipeline.resources.http import Endpoint, VendorUnavailableError
from m365_pipeline.resources.paging import ListRead, SaasPager, read_until_consistent
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

    async def read_once(listing: ListRead) -> None:
        ids = next(responses)
        reads.append(ids)
        listing.add([{"id": i} for i in ids], 2)

    listing = asyncio.run(read_until_consistent(read_once, lambda: restarts.append(1), warnings.append,
                                                "GET /users"))
    assert listing.keys == {1, 2} and len(reads) == 3 and len(restarts) == 2
    assert "GET /users changed while it was paged (3 distinct records collected but the vendor reports 2)" \
        in warnings[0]

    async def never_settles(listing: ListRead) -> None:
        listing.add([{"id": 1}], 2)

    with pytest.raises(VendorUnavailableError, match="GET /users kept changing while it was paged, 4 reads"):
        asyncio.run(read_until_consistent(never_settles, lambda: None, lambda _: None, "GET /users"))


def test_saas_pages_hand_each_page_and_its_total_to_the_list_read():
    bodies = {1: {"pagination": {"total_pages": 2, "total_items": 3}, "items": [{"id": "a"}, {"id": "b"}]},
              2: {"pagination": {"total_pages": 2, "total_items": 3}, "items": [{"id": "c"}]}}
    listing = ListRead()
    pager = SaasPager(lambda n: Endpoint("S", "/users", n), listing=listing)
    while pager.next is not None:
        pager.take(bodies[pager.next])
    assert listing.keys == {"a", "b", "c"} and listing.totals == [3] and listing.problem() is None


# -- source B: no totals, so pages overlap (paging.next_window) and a shifted list is read again ------------

def _meta(result, node: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(node)[0].metadata.items()}


@pytest.mark.slow
def test_a_mailbox_deleted_after_page_1_of_its_tenant_shifts_later_pages_and_the_list_is_read_again_losing_no_one(
        start_simulator, tmp_path):
    sim = start_simulator(seed=13, delete_backup_account="after_first_page", **SIZE)
    data_dir = tmp_path / "data"
    result = run_pipeline(sim, data_dir, backup={"per_page": 3})  # the largest tenant spans several pages
    assert sim.stats()["faults"].get("delete_backup_account") == 1
    assert result.success
    assert _meta(result, "raw__backup_accounts")["lists_read_again"] == 1
    owner, tenant = sim.dataset.largest_m365_tenant()
    served = [a["upn"] for a in sim.dataset.backup_accounts(owner.id, tenant.id)]  # without the deleted one
    db = data_dir / "m365.duckdb"
    landed = [row[0] for row in query(db, "SELECT upn FROM raw.backup_accounts WHERE tenant_id = ? ORDER BY rowid",
                                      [str(tenant.id)])]
    assert sorted(landed) == sorted(served), "a mailbox was skipped or doubled, or the deleted one kept"
    truth = ground_truth(sim.dataset)
    assert query(db, "SELECT count(*) FROM raw.backup_accounts")[0][0] == truth["raw_counts"]["backup_accounts"]
    assert _summary(db) == _expected(truth)


def _with_empty(rows: list[tuple], name: str) -> list[tuple]:
    """``rows`` plus an organization listed with no users, in rule 9's order."""
    return sorted([*rows, (name, 0, 0)], key=lambda row: (row[0].lower(), row[0]))


@pytest.mark.slow
@pytest.mark.parametrize(("moment", "node"), [
    ("after_detail", "raw__backup_tenants"),  # not listed any more when its tenants are read
    ("at_tenants", "raw__backup_tenants"),  # listed, then its tenants answer 404
])
def test_an_owner_deleted_after_its_organization_was_read_is_gone_with_a_warning_not_a_failed_night(
        start_simulator, tmp_path, moment, node):
    sim = start_simulator(seed=14, delete_backup_owner=moment, **SIZE)
    deleted = sim.dataset.listed_owners()[0]
    data_dir = tmp_path / "data"
    result = run_pipeline(sim, data_dir)
    assert result.success
    assert sim.stats()["faults"].get("delete_backup_owner") == 1
    assert _meta(result, node)["deleted_during_pull"] == 1
    db = data_dir / "m365.duckdb"
    assert query(db, "SELECT count(*) FROM raw.backup_tenants WHERE owner_id = ?", [deleted.id])[0][0] == 0
    truth = ground_truth(sim.dataset)  # the vendor without the owner
    # Its organization was listed when the night started: it stays on the list, with no users.
    assert _summary(db) == _with_empty(_expected(truth), deleted.name)


@pytest.mark.slow
def test_an_owner_deleted_before_its_mailboxes_were_read_is_gone_with_a_warning_not_a_failed_night(
        start_simulator, tmp_path):
    sim = start_simulator(seed=15, delete_backup_owner="at_accounts", **SIZE)
    deleted = sim.dataset.listed_owners()[0]
    data_dir = tmp_path / "data"
    result = run_pipeline(sim, data_dir)
    assert result.success
    assert _meta(result, "raw__backup_accounts")["deleted_during_pull"] == len(deleted.tenants)
    db = data_dir / "m365.duckdb"
    assert query(db, "SELECT count(*) FROM raw.backup_accounts WHERE owner_id = ?", [deleted.id])[0][0] == 0
    # Its tenants were read before it went, so its domains still count for rule 3 that night: the expected
    # numbers are the contract applied to the vendor as the night read it.
    assert _summary(db) == _expected(ground_truth(_as_read_before_mailboxes(sim.dataset, deleted)))


def _as_read_before_mailboxes(ds, owner):
    """``ds`` as a pull saw it when ``owner`` was deleted after its tenants were listed: the owner and its
    tenants there, its mailboxes not (the public iterators the ground truth reads, overridden on the instance)."""
    listed, tenants, accounts = ds.listed_owners(), ds.backup_tenants, ds.backup_accounts
    ds.backup_owners = lambda: (ds.owner_record(o, full=True) for o in ds.owners if o in listed or o is owner)
    ds.backup_tenants = lambda owner_id: iter(ds.tenant_records(owner)) if owner_id == owner.id else tenants(owner_id)
    ds.backup_accounts = lambda owner_id, tenant_id: iter(()) if owner_id == owner.id else accounts(owner_id, tenant_id)
    return ds
