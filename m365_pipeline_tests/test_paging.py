"""Paging, record checks and name handling: the pagers and plain functions behind both clients.

The pagers do no I/O, so each test feeds them plain dicts as the vendor would answer, and a small loop
plays the vendor driver's part (the drivers themselves run over HTTP in test_raw_assets.py).
"""

from __future__ import annotations

import asyncio

import pytest

from m365_pipeline.landing import is_secret_field, snake_case, without_secrets
from m365_pipeline.resources.http import Endpoint, MalformedResponseError, VendorUnavailableError
from m365_pipeline.resources.paging import (
    BackupPager,
    ListShiftedError,
    SaasPager,
    next_window,
    page_bound,
    read_again_if_shifted,
    require_fields,
)


def _where(page: int) -> Endpoint:
    return Endpoint("source X", "/things", page)


def saas_pages(fetch, where=_where, listing=None, max_pages=1000):
    """What saas.py's driver does, one page at a time: ``(page_number, items)`` until the pager says done."""
    pager = SaasPager(where, max_pages, listing)
    while (page_number := pager.next) is not None:
        _, items = pager.take(fetch(page_number))
        yield page_number, items


def backup_pages(fetch, where, per_page, max_pages=100_000):
    """What backup.py's driver does: every request the pager asks for, the boundary checks' answers too."""
    pager = BackupPager(where, per_page, max_pages)
    while (request := pager.next) is not None:
        taken = pager.take(fetch(request.page, request.per_page))
        if taken is not None:
            yield taken


def _saas_fetcher(pages: list[list[int]], total_pages: int):
    calls: list[int] = []

    def fetch(page_number: int) -> dict:
        calls.append(page_number)
        items = pages[page_number - 1] if page_number <= len(pages) else []
        return {"pagination": {"page_size": 3, "page_number": page_number, "total_pages": total_pages,
                               "total_items": sum(map(len, pages))}, "items": items}
    return fetch, calls


@pytest.mark.parametrize(
    ("pages", "total_pages", "expected_calls"),
    [
        ([[1, 2, 3], [4]], 2, [1, 2]),
        # a short page in the middle is not the end: total_pages decides
        ([[1], [2, 3, 4], [5]], 3, [1, 2, 3]),
        # total_pages 0 means no items: one call, then stop
        ([[]], 0, [1]),
        ([[1, 2, 3]], 1, [1]),
    ],
)
def test_saas_paging_follows_total_pages_not_page_length(pages, total_pages, expected_calls):
    fetch, calls = _saas_fetcher(pages, total_pages)
    got = [item for _, items in saas_pages(fetch, _where) for item in items]
    assert calls == expected_calls
    assert got == [item for page in pages[: len(expected_calls)] for item in page]


@pytest.mark.parametrize(
    ("totals", "expected_planned", "expected_read"),
    [
        ([3, 3, 3], [2, 3], [1, 2, 3]),
        # a later page says the list grew: the driver reads the pages past the plan one by one
        ([2, 4, 4, 4], [2], [1, 2, 3, 4]),
        # ...or that it shrank: the pages planned past the new end are not read
        ([4, 2], [2, 3, 4], [1, 2]),
        ([1], [], [1]),
    ],
)
def test_saas_pages_after_the_first_are_planned_as_many_as_the_first_says(totals, expected_planned,
                                                                          expected_read):
    def body(page_number: int) -> dict:
        total = totals[min(page_number, len(totals)) - 1]
        return {"pagination": {"total_pages": total}, "items": [page_number] if page_number <= total else []}

    pager = SaasPager(_where, max_pages=1000)
    read = []
    while (page_number := pager.next) is not None:
        pager.take(body(page_number))
        read.append(page_number)
        if page_number == 1:
            assert list(pager.planned) == expected_planned
    assert read == expected_read


@pytest.mark.parametrize(("pagination", "bound"), [
    ({"total_pages": 10**9, "total_items": 5}, 5),  # 5 items fill 5 pages at most, however short
    ({"total_pages": 10**9, "total_items": 10**9}, 1000),  # the configured maximum
    ({"total_pages": 10**9}, 1000),  # no total_items: the configured maximum
    ({"total_pages": 2, "total_items": 0}, 1),  # an empty list takes one page
])
def test_a_page_claiming_a_billion_pages_is_refused_at_a_bound_from_its_totals(pagination, bound):
    pager = SaasPager(_where, max_pages=1000)
    with pytest.raises(MalformedResponseError, match=rf"\(page 1\).*more than the {bound} pages"):
        pager.take({"pagination": pagination, "items": [1]})
    assert pager.next == 1  # nothing planned past the refused page


def test_a_later_page_claiming_more_pages_than_its_items_fill_is_refused_too():
    pager = SaasPager(_where, max_pages=1000)
    pager.take({"pagination": {"total_pages": 2, "total_items": 4}, "items": [1, 2]})
    with pytest.raises(MalformedResponseError, match=r"\(page 2\).*total_pages is 50, more than the 4 pages"):
        pager.take({"pagination": {"total_pages": 50, "total_items": 4}, "items": [3, 4]})


@pytest.mark.parametrize(("total_items", "max_pages", "bound"), [
    (0, 50, 1), (1, 50, 1), (7, 50, 7), (10**9, 50, 50), (None, 50, 50), ("12", 50, 50), (-3, 50, 50),
    (True, 50, 50),
])
def test_the_page_bound_is_one_page_per_item_capped_at_max_pages(total_items, max_pages, bound):
    assert page_bound(total_items, max_pages) == bound


@pytest.mark.parametrize("bad", [None, "2", -1, True, 1.5])
def test_saas_paging_rejects_a_missing_or_odd_total_pages(bad):
    def fetch(page_number):
        return {"pagination": {"total_pages": bad}, "items": []}
    with pytest.raises(MalformedResponseError, match=r"source X GET /things \(page 1\).*total_pages"):
        list(saas_pages(fetch, _where))


def _backup_where(page: int, per_page: int) -> Endpoint:
    return Endpoint("source X", "/things", page)


def _backup_fetcher(pages: dict[int, dict]):
    calls: list[int] = []

    def fetch(page: int, per_page: int) -> dict:
        calls.append(page)
        return pages[page]
    return fetch, calls


def test_backup_paging_follows_next_page_until_it_is_absent_and_a_short_page_is_not_the_end():
    pages = {
        1: {"pagination": {"current_page": 1, "per_page": 3, "next_page": 2}, "data": [1, 2]},
        2: {"pagination": {"current_page": 2, "per_page": 3, "next_page": 3, "prev_page": 1}, "data": [3]},
        3: {"pagination": {"current_page": 3, "per_page": 3, "prev_page": 2}, "data": [4, 5, 6]},
    }
    fetch, calls = _backup_fetcher(pages)
    assert [x for _, data in backup_pages(fetch, _backup_where, 3) for x in data] == [1, 2, 3, 4, 5, 6]
    assert calls == [1, 2, 3]


class _PagedList:
    """A list served as source B pages it (page n of size p holds positions (n-1)*p to n*p - 1, next_page
    only when more follow); ``changes`` maps a call number to an edit made right after that call was answered."""

    def __init__(self, n: int, changes: dict | None = None):
        self.records = [{"id": i} for i in range(n)]
        self.changes = changes or {}
        self.calls: list[tuple[int, int]] = []

    def fetch(self, page: int, per_page: int) -> dict:
        self.calls.append((page, per_page))
        start = (page - 1) * per_page
        data = self.records[start:start + per_page]
        pagination = {"current_page": page, "per_page": per_page if data else 0}
        if start + per_page < len(self.records):
            pagination["next_page"] = page + 1
        if len(self.calls) in self.changes:
            self.changes[len(self.calls)](self.records)
        return {"pagination": pagination, "data": data}

    def read(self, per_page: int) -> list:
        return [r["id"] for _, data in backup_pages(self.fetch, _backup_where, per_page) for r in data]


@pytest.mark.parametrize("per_page", [100, 7, 3, 2, 1])
@pytest.mark.parametrize("n", [0, 1, 2, 6, 7, 99, 100, 101, 250, 1203])
def test_backup_paging_reads_every_record_exactly_once_through_overlapping_pages(n, per_page):
    vendor = _PagedList(n)
    assert vendor.read(per_page) == list(range(n))


@pytest.mark.parametrize("n", [1, 50, 100])
def test_a_source_b_list_of_one_page_costs_one_call(n):
    vendor = _PagedList(n)
    vendor.read(100)
    assert vendor.calls == [(1, 100)]


@pytest.mark.parametrize("per_page", [100, 7, 2, 1])
@pytest.mark.parametrize(("edit", "what"), [
    (lambda records: records.pop(0), "a record deleted before the next page"),
    (lambda records: records.insert(0, {"id": "new"}), "a record added before the next page"),
])
def test_a_source_b_list_that_shifts_while_paged_is_caught_before_a_record_is_skipped_or_doubled(per_page, edit,
                                                                                                    what):
    vendor = _PagedList(3 * per_page + 1, changes={1: edit})
    with pytest.raises(ListShiftedError, match="changed while it was paged"):
        vendor.read(per_page)


def test_a_record_deleted_after_the_pager_passed_it_changes_nothing_before_the_next_page():
    vendor = _PagedList(250, changes={1: lambda records: records.pop(200)})  # not read yet: no shift seen
    assert vendor.read(100) == [i for i in range(250) if i != 200]


def test_a_shifted_source_b_list_is_read_again_until_a_read_is_clean_then_fails_clearly():
    vendor = _PagedList(250, changes={1: lambda records: records.pop(0)})
    noted: list[str] = []
    async def read(paged: _PagedList) -> list:
        return paged.read(100)

    assert asyncio.run(read_again_if_shifted(lambda: read(vendor), noted.append)) == list(range(1, 250))
    assert len(noted) == 1 and "/things" in noted[0]

    restless = _PagedList(250, changes={k: (lambda records: records.pop(0)) for k in range(1, 100, 2)})
    with pytest.raises(VendorUnavailableError, match="kept changing, 4 reads in a row"):
        asyncio.run(read_again_if_shifted(lambda: read(restless), noted.append))


@pytest.mark.parametrize(("end", "per_page", "window"), [
    (0, 100, (1, 100, 0)),  # the first page
    (100, 100, (2, 99, 1)),  # positions 99-197: one record read again
    (198, 100, (3, 98, 2)),
    (2, 2, (2, 2, 0)),  # no size overlaps: the boundary record is checked alone
    (1, 1, (2, 1, 0)),
])
def test_the_next_source_b_page_overlaps_the_records_already_read(end, per_page, window):
    assert next_window(end, per_page) == window


@pytest.mark.parametrize("end", range(1, 5000, 37))
def test_every_next_page_starts_inside_what_was_read_and_moves_past_it(end):
    page, size, overlap = next_window(end, 100)
    start = (page - 1) * size
    assert overlap >= 1 and start == end - overlap and start + size > end and size - overlap >= 50


def test_backup_paging_treats_empty_page_with_per_page_zero_as_normal_end():
    pages = {1: {"pagination": {"current_page": 1, "per_page": 0}, "data": []}}
    fetch, calls = _backup_fetcher(pages)
    assert [data for _, data in backup_pages(fetch, _backup_where, 2)] == [[]]
    assert calls == [1]


@pytest.mark.parametrize("next_page", [1, "2", -4])
def test_backup_paging_refuses_a_next_page_that_does_not_move_forward(next_page):
    pages = {1: {"pagination": {"current_page": 1, "next_page": next_page}, "data": [1]}}
    fetch, _ = _backup_fetcher(pages)
    with pytest.raises(MalformedResponseError, match="does not move forward"):
        list(backup_pages(fetch, _backup_where, 2))


def test_a_source_b_next_page_that_never_ends_stops_at_max_pages():
    def fetch(page: int, per_page: int) -> dict:  # an endless list: every page full, and always another one
        start = (page - 1) * per_page
        return {"pagination": {"next_page": page + 1}, "data": [{"id": start + i} for i in range(per_page)]}
    read = []
    with pytest.raises(MalformedResponseError, match=r"still a next_page after 25 pages \(max_pages 25\)"):
        for page in backup_pages(fetch, _backup_where, 3, max_pages=25):
            read.append(page)
    assert len(read) == 24


@pytest.mark.parametrize("body", [[], {"data": "x", "pagination": {}}, {"data": []}, "oops"])
def test_backup_paging_names_endpoint_and_page_of_a_malformed_body(body):
    with pytest.raises(MalformedResponseError, match=r"source X GET /things \(page 1\)"):
        list(backup_pages(lambda page, per_page: body, _backup_where, 2))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"id": 1}, {"name": "x"}], "record 1 has no id"),
        ([{"id": None}], "record 0 has no id"),
        (["not an object"], "record 0 is a str"),
    ],
)
def test_require_fields_says_which_record_is_malformed(records, message):
    with pytest.raises(MalformedResponseError, match=message):
        require_fields(records, ("id",), _where(4))


@pytest.mark.parametrize(
    ("vendor", "snake"),
    [("displayName", "display_name"), ("isInReview", "is_in_review"), ("id", "id"),
     ("organization_name", "organization_name"), ("userCostPerMonth", "user_cost_per_month"),
     ("vendorId", "vendor_id"), ("applicationID", "application_id")],
)
def test_snake_case(vendor, snake):
    assert snake_case(vendor) == snake


@pytest.mark.parametrize(
    ("field", "secret"),
    [("authentication_token", True), ("reseller_token", True), ("X-Access-Token", True),
     ("password", True), ("email", False), ("id", False), ("organization_name", False)],
)
def test_token_fields_are_recognised(field, secret):
    assert is_secret_field(field) is secret


def test_without_secrets_drops_every_token_field():
    owner = {"id": "1-2", "authentication_token": "t", "reseller_token": "r", "email": "a@b.c"}
    assert without_secrets(owner) == {"id": "1-2", "email": "a@b.c"}


def test_a_token_field_is_dropped_even_after_many_records_without_one():
    for n in range(3):  # the keys of records without a credential are remembered as plain
        assert without_secrets({"id": n, "email": "a@b.c"}) == {"id": n, "email": "a@b.c"}
    assert without_secrets({"id": 9, "email": "a@b.c", "authentication_token": "t"}) == {"id": 9, "email": "a@b.c"}
