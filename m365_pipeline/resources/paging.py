"""The two vendors' paging schemes and record checks: pagers that decide the next request from the last
answer and do no I/O (the vendor drivers in saas.py and backup.py make the calls), and plain functions.

Source S pages by ``page_number`` until ``page_number >= pagination.total_pages``;
source B pages until a response carries no ``next_page``. Neither treats a short
page as the end: vendors return short pages mid-stream.

A list that changes while it is paged shifts its later pages. Source S reports its total, so a
read is checked against it (``ListRead``); source B reports none, so each of its pages after the
first re-reads the end of the one before (``next_window``). Either way the list is read again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from m365_pipeline.resources.http import Endpoint, MalformedResponseError, VendorUnavailableError, vendor_value

# A vendor that keeps saying "there is a next page" must not keep a run alive forever: the default of the
# resources' ``max_pages`` (100M source S users at 1,000 a page; 10M mailboxes in one tenant at 100).
MAX_PAGES = 100_000
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


async def read_until_consistent(
    read_once: Callable[[ListRead], Awaitable[None]], restart: Callable[[], None], warn: Callable[[str], None],
    what: str, attempts: int = MAX_LIST_READS,
) -> ListRead:
    """Read a whole list with ``read_once`` until a read agrees with itself; ``restart`` drops a bad read."""
    for attempt in range(1, attempts + 1):
        listing = ListRead()
        await read_once(listing)
        problem = listing.problem()
        if problem is None:
            return listing
        if attempt < attempts:
            warn(f"{what} changed while it was paged ({problem}); reading it again ({attempt + 1} of {attempts})")
            restart()
    # Still changing: an outage of sorts (a bulk import at the vendor); the run is retried later.
    raise VendorUnavailableError(f"{what} kept changing while it was paged, {attempts} reads in a row: {problem}")


def page_bound(total_items: Any, max_pages: int) -> int:
    """The most pages a list may take: one per item when the vendor says how many it holds (a short page
    mid-stream is normal, so its page size bounds nothing; but a page holds at least one item), at least
    one page, and never more than ``max_pages``."""
    if _whole(total_items) and total_items >= 0:
        return max(1, min(max_pages, total_items))
    return max_pages


class SaasPager:
    """Source S's paging, decided from each answer alone (it does no I/O): ``next`` is the page to ask for.

    Pages run from 1 to ``pagination.total_pages`` of the latest answer; ``planned`` holds the pages the
    first answer says follow it, for a caller that asks for them ahead. A count of pages beyond what
    ``total_items`` can fill (or beyond ``max_pages``) is refused before it is followed.
    """

    def __init__(self, where: Callable[[int], Endpoint], max_pages: int = MAX_PAGES,
                 listing: ListRead | None = None) -> None:
        self.where, self.max_pages, self.listing = where, max_pages, listing
        self.next: int | None = 1
        self.planned: range = range(0)

    def take(self, body: Any) -> tuple[Endpoint, list[Any]]:
        """The items of the answer to page ``next``; moves ``next`` on (None after the last page)."""
        page_number = self.next
        if page_number is None:
            raise ValueError("the list was read to its end")
        endpoint = self.where(page_number)
        items = _list_field(body, "items", endpoint)
        pagination = body.get("pagination")
        total_pages = pagination.get("total_pages") if isinstance(pagination, dict) else None
        if not _whole(total_pages) or total_pages < 0:
            raise MalformedResponseError(
                f"{endpoint.describe()}: pagination.total_pages is missing or not a whole number"
            )
        total_items = pagination.get("total_items")
        bound = page_bound(total_items, self.max_pages)
        if total_pages > bound:
            why = (f"its total_items ({total_items}) can fill" if bound < self.max_pages
                   else f"allowed (max_pages {self.max_pages})")
            raise MalformedResponseError(
                f"{endpoint.describe()}: pagination.total_pages is {total_pages}, more than the {bound} pages "
                f"{why}; not followed"
            )
        if self.listing is not None:
            self.listing.add(items, total_items)
        if page_number == 1:
            self.planned = range(2, total_pages + 1)
        self.next = page_number + 1 if page_number < total_pages else None
        return endpoint, items


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


class Request(NamedTuple):
    page: int
    per_page: int


class BackupPager:
    """Source B's paging, decided from each answer alone (it does no I/O): ``next`` is the request to make.

    Pages follow ``next_page`` until an answer has none. Source B reports no totals, so each page after the
    first overlaps the records already read (see ``next_window``); when they differ, the list changed under
    the pull and ``ListShiftedError`` is raised for the caller to read it again. When no page size overlaps,
    ``next`` is first the boundary record alone, which must still be the last one read. After a short page
    (a vendor quirk) positions are unknown: the next page follows it without an overlap, as the vendor's own
    ``next_page`` does. A ``next_page`` that never ends stops after ``max_pages`` pages.
    """

    def __init__(self, where: Callable[[int, int], Endpoint], per_page: int, max_pages: int = MAX_PAGES) -> None:
        self.where, self.per_page, self.max_pages = where, per_page, max_pages
        self.next: Request | None = Request(1, per_page)
        self._overlap = 0
        self._tail: list[Any] = []  # the last records read (at most per_page), which the next overlap re-reads
        self._boundary: tuple[Any, Request] | None = None  # (the record expected, the page after the check)
        self._pages = 0

    def take(self, body: Any) -> tuple[Endpoint, list[Any]] | None:
        """The new records of the answer to ``next`` (None for a boundary check); moves ``next`` on."""
        if self.next is None:
            raise ValueError("the list was read to its end")
        page, size = self.next
        endpoint = self.where(page, size)
        if self._boundary is not None:
            last, self.next = self._boundary
            self._boundary = None
            if _list_field(body, "data", endpoint) != [last]:
                raise ListShiftedError(f"{endpoint.describe()}: the list changed while it was paged "
                                       "(records before this page moved)")
            return None
        data = _list_field(body, "data", endpoint)
        pagination = body.get("pagination")
        if not isinstance(pagination, dict):
            raise MalformedResponseError(f"{endpoint.describe()}: the response has no pagination object")
        overlap, tail = self._overlap, self._tail
        if data[:overlap] != tail[len(tail) - overlap:]:
            raise ListShiftedError(f"{endpoint.describe()}: the list changed while it was paged "
                                   "(records before this page moved)")
        new = data[overlap:]
        self._pages += 1
        next_page = pagination.get("next_page")
        if next_page in (None, "", 0):
            self.next = None
            return endpoint, new
        if not _whole(next_page) or next_page <= page:
            raise MalformedResponseError(f"{endpoint.describe()}: next_page {vendor_value(next_page)} does not "
                                         "move forward")
        if self._pages >= self.max_pages:
            raise MalformedResponseError(f"{endpoint.describe()}: still a next_page after {self._pages} pages "
                                         f"(max_pages {self.max_pages}); not followed further")
        if len(data) < size:  # a short page mid-stream: follow it as the vendor says, unchecked
            self.next, self._overlap, self._tail = Request(next_page, size), 0, []
            return endpoint, new
        self._tail = (tail + new)[-self.per_page:]
        page, size, self._overlap = next_window(page * size, self.per_page)
        self.next = Request(page, size)
        if self._overlap == 0:  # the record at position (page - 1) * size - 1, read alone first
            self._boundary = (self._tail[-1], self.next)
            self.next = Request((page - 1) * size, 1)
        return endpoint, new


async def read_again_if_shifted(read: Callable[[], Awaitable[T]], noted: Callable[[str], None],
                                attempts: int = MAX_LIST_READS) -> T:
    """``read()`` a whole list, again when it shifted while paged (``noted`` hears why); then a clear error."""
    for attempt in range(1, attempts + 1):
        try:
            return await read()
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


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
