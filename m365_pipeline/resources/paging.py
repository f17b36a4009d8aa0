"""The two vendors' paging schemes and record checks, as plain functions.

Source S pages by ``page_number`` until ``page_number >= pagination.total_pages``;
source B pages until a response carries no ``next_page``. Neither treats a short
page as the end: vendors return short pages mid-stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from m365_pipeline.resources.http import Endpoint, MalformedResponseError

# A vendor that keeps saying "there is a next page" must not keep a run alive forever.
MAX_PAGES = 1_000_000


def saas_pages(
    fetch: Callable[[int], Any], where: Callable[[int], Endpoint]
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield ``(page_number, items)`` for every page of a source S collection."""
    page_number = 1
    while True:
        body = fetch(page_number)
        endpoint = where(page_number)
        items = _list_field(body, "items", endpoint)
        pagination = body.get("pagination")
        total_pages = pagination.get("total_pages") if isinstance(pagination, dict) else None
        if not isinstance(total_pages, int) or isinstance(total_pages, bool) or total_pages < 0:
            raise MalformedResponseError(
                f"{endpoint.describe()}: pagination.total_pages is missing or not a whole number"
            )
        yield page_number, items
        if page_number >= total_pages:
            return
        page_number += 1
        _guard(page_number, endpoint)


def backup_pages(
    fetch: Callable[[int], Any], where: Callable[[int], Endpoint]
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield ``(page, data)`` for every page of a source B collection, following ``next_page``."""
    page = 1
    while True:
        body = fetch(page)
        endpoint = where(page)
        data = _list_field(body, "data", endpoint)
        pagination = body.get("pagination")
        if not isinstance(pagination, dict):
            raise MalformedResponseError(f"{endpoint.describe()}: the response has no pagination object")
        yield page, data
        next_page = pagination.get("next_page")
        if next_page in (None, "", 0):
            return
        if not isinstance(next_page, int) or isinstance(next_page, bool) or next_page <= page:
            raise MalformedResponseError(
                f"{endpoint.describe()}: next_page {next_page!r} does not move forward"
            )
        page = next_page
        _guard(page, endpoint)


def require_fields(
    records: Sequence[Any], required: Sequence[str], endpoint: Endpoint
) -> list[dict[str, Any]]:
    """Check every record is an object carrying each required field with a value."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise MalformedResponseError(
                f"{endpoint.describe()}: record {index} is a {type(record).__name__}, not an object"
            )
        missing = [name for name in required if record.get(name) is None]
        if missing:
            raise MalformedResponseError(
                f"{endpoint.describe()}: record {index} has no {', '.join(missing)}"
            )
    return list(records)


def _list_field(body: Any, name: str, endpoint: Endpoint) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get(name), list):
        raise MalformedResponseError(f"{endpoint.describe()}: the response has no '{name}' list")
    return body[name]


def _guard(page: int, endpoint: Endpoint) -> None:
    if page > MAX_PAGES:
        raise MalformedResponseError(f"{endpoint.describe()}: more than {MAX_PAGES} pages; giving up")
