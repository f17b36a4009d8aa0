"""The two vendors' paging schemes and record checks, as plain functions.

Source S pages by ``page_number`` until ``page_number >= pagination.total_pages``;
source B pages until a response carries no ``next_page``. Neither treats a short
page as the end: vendors return short pages mid-stream.

A list that changes while it is paged shifts its later pages. Source S reports its total, so a
read is checked against it (``ListRead``); source B reports none, so each of its pages after the
first re-reads the end of the one before (``next_window``). Either way the list is read again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from m365_pipeline.resources.http import Endpoint, MalformedResponseError, VendorUnavailableError

# A vendor that keeps saying "there is a next page" must not keep a run alive forever.
MAX_PAGES = 1_000_000
# A list that changes while it is paged is read again, this many times in all before the pull fails.
MAX_LIST_READS = 4

T = TypeVar("T")


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
    fetch: Callable[[int], Any], where: Callable[[int], Endpoint], listing: ListRead | None = None,
    fetch_many: Callable[[Iterable[int]], Iterator[Any]] | None = None,
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield ``(page_number, items)`` for every page of a source S collection; ``listing`` sees each page.

    With ``fetch_many`` (bodies of the given page numbers, in order), the pages after the first, whose
    count the first one gives, are asked for together rather than one round trip at a time. Should a
    later page report more pages than the first did, those are read one by one.
    """
    page_number, body = 1, fetch(1)
    ahead: Iterator[Any] = iter(())
    try:
        while True:
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
            if page_number == 2 and fetch_many is not None:
                ahead = fetch_many(range(2, min(total_pages, MAX_PAGES) + 1))
            body = next(ahead, _NONE)
            if body is _NONE:
                body = fetch(page_number)
    finally:
        close = getattr(ahead, "close", None)
        if close is not None:
            close()  # pages asked for but no longer wanted are cancelled


_NONE = object()


class ListShiftedError(VendorUnavailableError):
    """Records already read moved while a list was paged: a record was deleted or added before the page."""


def next_window(end: int, per_page: int) -> tuple[int, int, int]:
    """``(page, per_page, overlap)`` of the read that follows the first ``end`` positions of a page-numbered list.

    Page ``n`` of size ``p`` holds positions ``[(n-1)*p, n*p)``, so a size that does not divide ``end`` gives
    a window that starts ``end % p`` positions back: those records are read twice, and a record deleted or
    added earlier in the list while it is paged shows as a changed overlap. Of the sizes up to ``per_page``
    the one that moves furthest is taken; overlap 0 means no size overlaps (``end`` is 0, or ``per_page`` is
    tiny) and the caller checks the boundary record on its own.
    """
    best = (end // per_page + 1, per_page, 0)
    for size in range(per_page, 1, -1):
        overlap = end % size
        if overlap and (best[2] == 0 or size - overlap > best[1] - best[2]):
            best = ((end - overlap) // size + 1, size, overlap)
    return best


def backup_pages(
    fetch: Callable[[int, int], Any], where: Callable[[int, int], Endpoint], per_page: int
) -> Iterator[tuple[Endpoint, list[dict[str, Any]]]]:
    """Yield ``(endpoint, new records)`` for every page of a source B collection until one has no ``next_page``.

    Source B reports no totals, so each page after the first overlaps the records already read (see
    ``next_window``); when they differ, the list changed under the pull and ``ListShiftedError`` is raised
    for the caller to read it again. After a short page (a vendor quirk) positions are unknown: the next page
    follows it without an overlap, as the vendor's own ``next_page`` does.
    """
    page, size, overlap = 1, per_page, 0
    tail: list[Any] = []  # the last records read (at most per_page), which the next overlap re-reads
    while True:
        endpoint = where(page, size)
        body = fetch(page, size)
        data = _list_field(body, "data", endpoint)
        pagination = body.get("pagination")
        if not isinstance(pagination, dict):
            raise MalformedResponseError(f"{endpoint.describe()}: the response has no pagination object")
        if data[:overlap] != tail[len(tail) - overlap:]:
            raise ListShiftedError(f"{endpoint.describe()}: the list changed while it was paged "
                                   "(records before this page moved)")
        yield endpoint, data[overlap:]
        next_page = pagination.get("next_page")
        if next_page in (None, "", 0):
            return
        if not isinstance(next_page, int) or isinstance(next_page, bool) or next_page <= page:
            raise MalformedResponseError(f"{endpoint.describe()}: next_page {next_page!r} does not move forward")
        if len(data) < size:  # a short page mid-stream: follow it as the vendor says, unchecked
            page, overlap, tail = next_page, 0, []
        else:
            tail = (tail + data[overlap:])[-per_page:]
            page, size, overlap = next_window(page * size, per_page)
            if overlap == 0:
                _check_boundary(fetch, where, page_end=(page - 1) * size, last=tail[-1])
        _guard(page, endpoint)


def _check_boundary(fetch: Callable[[int, int], Any], where: Callable[[int, int], Endpoint], page_end: int,
                    last: Any) -> None:
    """Read the record at position ``page_end - 1`` alone: it must still be the last one read."""
    endpoint = where(page_end, 1)
    data = _list_field(fetch(page_end, 1), "data", endpoint)
    if data != [last]:
        raise ListShiftedError(f"{endpoint.describe()}: the list changed while it was paged "
                               "(records before this page moved)")


def read_again_if_shifted(read: Callable[[], T], noted: Callable[[str], None], attempts: int = MAX_LIST_READS) -> T:
    """``read()`` a whole list, again when it shifted while paged (``noted`` hears why); then a clear error."""
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except ListShiftedError as exc:
            if attempt == attempts:
                raise VendorUnavailableError(f"{exc}; it kept changing, {attempts} reads in a row") from None
            noted(str(exc))
    raise AssertionError("unreachable")


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
