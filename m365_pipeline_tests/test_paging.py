"""Paging, record checks and name handling: the plain functions behind both clients."""

from __future__ import annotations

import pytest

from m365_pipeline.landing import is_secret_field, snake_case, without_secrets
from m365_pipeline.resources.http import Endpoint, MalformedResponseError, VendorUnavailableError
from m365_pipeline.resources.paging import (
    ListShiftedError,
    backup_pages,
    next_window,
    read_again_if_shifted,
    require_fields,
    saas_pages,
)


def _where(page: int) -> Endpoint:
    return Endpoint("source X", "/things", page)


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
    ("totals", "expected_asked_ahead", "expected_one_by_one"),
    [
        ([3, 3, 3], [2, 3], []),
        # a later page says the list grew: the pages past what the first said are read one by one
        ([2, 4, 4, 4], [2], [3, 4]),
        # ...or that it shrank: the pages asked for past the new end are not used
        ([4, 2], [2, 3, 4], []),
        ([1], [], []),
    ],
)
def test_saas_pages_after_the_first_are_asked_for_together_as_many_as_the_first_says(
        totals, expected_asked_ahead, expected_one_by_one):
    def body(page_number: int) -> dict:
        total = totals[min(page_number, len(totals)) - 1]
        return {"pagination": {"total_pages": total}, "items": [page_number] if page_number <= total else []}

    asked_ahead: list[int] = []
    one_by_one: list[int] = []

    def fetch_many(page_numbers):
        asked_ahead.extend(page_numbers)
        return (body(n) for n in page_numbers)

    def fetch(page_number: int) -> dict:
        if page_number > 1:
            one_by_one.append(page_number)
        return body(page_number)

    got = [page for page, _ in saas_pages(fetch, _where, fetch_many=fetch_many)]
    assert asked_ahead == expected_asked_ahead and one_by_one == expected_one_by_one
    assert got == list(range(1, len(got) + 1)) and got[-1] == totals[min(len(got), len(totals)) - 1]


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
    assert read_again_if_shifted(lambda: vendor.read(100), noted.append) == list(range(1, 250))
    assert len(noted) == 1 and "/things" in noted[0]

    restless = _PagedList(250, changes={k: (lambda records: records.pop(0)) for k in range(1, 100, 2)})
    with pytest.raises(VendorUnavailableError, match="kept changing, 4 reads in a row"):
        read_again_if_shifted(lambda: restless.read(100), noted.append)


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
