"""Source S: the SaaS-management "consolidated view" API (users and their subscriptions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from pydantic import Field

from m365_pipeline.resources.base import VendorApiResource
from m365_pipeline.resources.http import (
    Endpoint,
    HttpSettings,
    Page,
    VendorClient,
    VendorError,
    can_fetch_ahead,
    fetched_ahead,
    path_segment,
    validate_base_url,
)
from m365_pipeline.resources.paging import ListRead, require_fields, saas_pages

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

    def _collection(self, path: str, required: tuple[str, ...], listing: ListRead | None = None,
                    ahead: int = 0) -> Iterator[Page]:
        """Every page of ``path``; with ``ahead``, that many pages after the first are asked for at once."""
        def fetch(page_number: int) -> Any:
            return self.get_json(
                path, params={"page_size": self.page_size, "page_number": page_number}, page=page_number
            )

        def where(page_number: int) -> Endpoint:
            return Endpoint(self.source_name, path, page_number)

        def fetch_many(page_numbers: Iterable[int]) -> Iterator[Any]:
            return fetched_ahead(page_numbers, fetch, ahead=ahead)

        for page_number, items in saas_pages(fetch, where, listing,
                                             fetch_many if ahead and can_fetch_ahead() else None):
            endpoint = where(page_number)
            yield endpoint, require_fields(items, required, endpoint)

    def user_pages(self, listing: ListRead | None = None) -> Iterator[Page]:
        """Every page of ``/users``, in order, the later ones fetched ``PAGES_AHEAD`` at a time."""
        return self._collection("/users", USER_REQUIRED, listing, ahead=PAGES_AHEAD)

    def subscription_pages(self, user_id: str) -> list[Page]:
        """Every page of one user's subscriptions (usually one)."""
        path = f"/users/{path_segment(user_id)}/subscriptions"
        return list(self._collection(path, SUBSCRIPTION_REQUIRED))


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
