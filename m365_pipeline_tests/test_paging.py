"""Paging, record checks and name handling: the plain functions behind both clients."""

from __future__ import annotations

import pytest

from m365_pipeline.landing import is_secret_field, snake_case, without_secrets
from m365_pipeline.resources.http import Endpoint, MalformedResponseError
from m365_pipeline.resources.paging import backup_pages, require_fields, saas_pages


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


@pytest.mark.parametrize("bad", [None, "2", -1, True, 1.5])
def test_saas_paging_rejects_a_missing_or_odd_total_pages(bad):
    def fetch(page_number):
        return {"pagination": {"total_pages": bad}, "items": []}
    with pytest.raises(MalformedResponseError, match=r"source X GET /things \(page 1\).*total_pages"):
        list(saas_pages(fetch, _where))


def _backup_fetcher(pages: dict[int, dict]):
    calls: list[int] = []

    def fetch(page: int) -> dict:
        calls.append(page)
        return pages[page]
    return fetch, calls


def test_backup_paging_follows_next_page_until_it_is_absent():
    pages = {
        1: {"pagination": {"current_page": 1, "per_page": 2, "next_page": 2}, "data": [1, 2]},
        2: {"pagination": {"current_page": 2, "per_page": 1, "next_page": 3, "prev_page": 1}, "data": [3]},
        3: {"pagination": {"current_page": 3, "per_page": 2, "prev_page": 2}, "data": [4, 5]},
    }
    fetch, calls = _backup_fetcher(pages)
    assert [x for _, data in backup_pages(fetch, _where) for x in data] == [1, 2, 3, 4, 5]
    assert calls == [1, 2, 3]


def test_backup_paging_treats_empty_page_with_per_page_zero_as_normal_end():
    pages = {1: {"pagination": {"current_page": 1, "per_page": 0}, "data": []}}
    fetch, calls = _backup_fetcher(pages)
    assert list(backup_pages(fetch, _where)) == [(1, [])]
    assert calls == [1]


@pytest.mark.parametrize("next_page", [1, "2", -4])
def test_backup_paging_refuses_a_next_page_that_does_not_move_forward(next_page):
    pages = {1: {"pagination": {"current_page": 1, "next_page": next_page}, "data": [1]}}
    fetch, _ = _backup_fetcher(pages)
    with pytest.raises(MalformedResponseError, match="does not move forward"):
        list(backup_pages(fetch, _where))


@pytest.mark.parametrize("body", [[], {"data": "x", "pagination": {}}, {"data": []}, "oops"])
def test_backup_paging_names_endpoint_and_page_of_a_malformed_body(body):
    with pytest.raises(MalformedResponseError, match=r"source X GET /things \(page 1\)"):
        list(backup_pages(lambda page: body, _where))


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
