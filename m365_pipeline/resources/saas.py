"""Source S: the SaaS-management "consolidated view" API (users and their subscriptions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar

from pydantic import Field

from m365_pipeline.resources.base import VendorApiResource
from m365_pipeline.resources.http import (
    Endpoint,
    HttpSettings,
    Page,
    VendorClient,
    VendorError,
    fetched_ahead,
    path_segment,
    validate_base_url,
)
from m365_pipeline.resources.paging import ListRead, SaasPager, require_fields

SOURCE = "source S (SaaS management API)"
USER_REQUIRED = ("id",)
SUBSCRIPTION_REQUIRED = ("id",)
# Pages of /users asked for ahead of the one being stored: a 1M-user MSP has ~1,000 of them, one round trip
# each when read in turn. Bounded because each holds up to page_size users in memory; the adaptive limit
# still decides how many calls are in flight.
PAGES_AHEAD = 8


class SaasClient(VendorClient):
    """Pages through ``/users`` and each user's ``/users/{id}/subscriptions``."""

    source_name = SOURCE
    auth_variables = "SAAS_API_TOKEN"

    def __init__(self, base_url: str, token: str, settings: HttpSettings, page_size: int = 1000):
        super().__init__(base_url, {"Authorization": f"Bearer {token}"}, settings)
        self.page_size = page_size

    async def _collection(self, path: str, required: tuple[str, ...], listing: ListRead | None = None,
                          ahead: int = 0) -> AsyncIterator[Page]:
        """Every page of ``path``; the pages the first one says follow are asked for ``ahead`` at a time.

        Should a later page report more pages than the first did, those are read one by one; should it
        report fewer, the pages asked for past the new end are cancelled.
        """
        async def fetch(page_number: int) -> Any:
            return await self.get_json(
                path, params={"page_size": self.page_size, "page_number": page_number}, page=page_number
            )

        pager = SaasPager(lambda n: Endpoint(self.source_name, path, n), self.settings.max_pages, listing)
        endpoint, items = pager.take(await fetch(1))
        yield endpoint, require_fields(items, required, endpoint)
        async with aclosing(fetched_ahead(pager.planned, fetch, ahead=ahead)) as bodies:
            async for body in bodies:
                endpoint, items = pager.take(body)
                yield endpoint, require_fields(items, required, endpoint)
                if pager.next is None:  # a later page said the list got shorter: the rest is cancelled
                    return
        while pager.next is not None:
            endpoint, items = pager.take(await fetch(pager.next))
            yield endpoint, require_fields(items, required, endpoint)

    def user_pages(self, listing: ListRead | None = None) -> AsyncIterator[Page]:
        """Every page of ``/users``, in order, the later ones fetched ``PAGES_AHEAD`` at a time."""
        return self._collection("/users", USER_REQUIRED, listing, ahead=PAGES_AHEAD)

    async def subscription_pages(self, user_id: str) -> list[Page]:
        """Every page of one user's subscriptions (usually one)."""
        path = f"/users/{path_segment(user_id)}/subscriptions"
        return [page async for page in self._collection(path, SUBSCRIPTION_REQUIRED)]


class SaasApiResource(VendorApiResource):
    """Source S. Unset ``base_url`` means the source is skipped for the run."""

    source_label: ClassVar[str] = "source S"
    env_fields: ClassVar[dict[str, str]] = {"base_url": "SAAS_API_BASE_URL", "token": "SAAS_API_TOKEN"}

    base_url: str | None = Field(default=None, description="SAAS_API_BASE_URL, e.g. https://host/api/saas/consolidated-view/v1")
    token: str | None = Field(default=None, description="SAAS_API_TOKEN, sent as a Bearer token.")
    page_size: int = Field(default=1000, ge=1, le=1000, description="Items per page (the vendor's maximum is 1000).")

    def client(self) -> SaasClient:
        if not self.is_configured:
            raise VendorError("source S is not configured: set SAAS_API_BASE_URL and SAAS_API_TOKEN")
        token = self.deployed("token")
        if not token:
            raise VendorError("SAAS_API_BASE_URL is set but SAAS_API_TOKEN is empty: set the source S token")
        base_url = validate_base_url(self.url or "", "SAAS_API_BASE_URL")
        return SaasClient(base_url, token, self.http_settings(), self.page_size)
