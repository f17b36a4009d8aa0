"""The two vendors' paging schemes and record checks, as plain functions.

Source S pages by ``page_number`` until ``page_number >= pagination.total_pages``;
source B pages until a response carries no ``next_page``. Neither treats a short
page as the end: vendors return short pages mid-stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from m365_pipeline.resources.http import Endpoint, MalformedResponseError, VendorUnavailableError

# A vendor that keeps saying "there is a next page" must not keep a run alive forever.
MAX_PAGES = 1_000_000
# A list that changes while it is paged is read again, this many times in all before the pull fails.
MAX_LIST_READS = 4


class ListRead:
    """One read of a paged list: what was collected against what the vendor said it holds.

    A user deleted or added while the list is paged shifts every later page by one, so a pager
    skips or repeats a record. That shows as a total that changed between pages, a record seen
    twice, or fewer (more) distinct records than the vendor's total.
    """

    def __init__(self, key: str = "id"):
        self.key = key
        self.keys: set[Any] = set()
        self.records = 0
        self.totals: list[int] = []

    def add(self, items: list[dict[str, Any]], total: Any) -> None:
        self.records += len(items)
        self.keys.update(item.get(self.key) for item in items if isinstance(item, dict))
        if isinstance(total, int) and not isinstance(total, bool) and total not in self.totals:
            self.totals.append(total)

    def problem(self) -> str | None:
        """Why this read cannot be trusted, or None when it agrees with itself and the vendor."""
        if len(self.totals) > 1:
            return f"the total changed from {self.totals[0]} to {self.totals[-1]} between pages"
        if self.records != len(self.keys):
            return f"{self.records - len(self.keys)} records came twice"
        if self.totals and len(self.keys) != self.totals[0]:
            return f"{len(self.keys)} distinct records collected but the vendor reports {self.totals[0]}"
        return None


def read_until_consistent(
    read_once: Callable[[ListRead], None], restart: Callable[[], None], warn: Callable[[str], None],
    what: str, attempts: int = MAX_LIST_READS,
) -> ListRead:
    """Read a whole list with ``read_once`` until a read agrees with itself; ``restart`` drops a bad read."""
    for attempt in range(1, attempts + 1):
        listing = ListRead()
        read_once(listing)
        problem = listing.problem()
        if problem is None:
            return listing
        if attempt < attempts:
            warn(f"{what} changed while it was paged ({problem}); reading it again ({attempt + 1} of {attempts})")
            restart()
    # Still changing: an outage of sorts (a bulk import at the vendor); the run is retried later.
    raise VendorUnavailableError(f"{what} kept changing while it was paged, {attempts} reads in a row: {problem}")


def saas_pages(
    fetch: Callable[[int], Any], where: Callable[[int], Endpoint], listing: ListRead | None = None
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield ``(page_number, items)`` for every page of a source S collection; ``listing`` sees each page."""
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
        if listing is not None:
            listing.add(items, pagination.get("total_items"))
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
