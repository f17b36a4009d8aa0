"""Source B: the M365 backup sub-reseller API (owners, organizations, tenants, mailboxes)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from m365_pipeline.resources.base import VendorApiResource
from m365_pipeline.resources.http import (
    Endpoint,
    HttpSettings,
    MalformedResponseError,
    Page,
    VendorClient,
    VendorError,
    check_header_values,
    path_segment,
    validate_base_url,
)
from m365_pipeline.resources.paging import BackupPager, require_fields
from m365_pipeline.scrub import remember_secret

SOURCE = "source B (M365 backup reseller API)"
OWNER_REQUIRED = ("id", "authentication_token")
OWNER_DETAIL_REQUIRED = ("id", "organization_name")
TENANT_REQUIRED = ("id", "type", "domain")
ACCOUNT_REQUIRED = ("upn", "mailbox")


class BackupClient(VendorClient):
    """Owners come from the admin token; each owner's tenants and mailboxes need its own token."""

    source_name = SOURCE
    auth_variables = "BACKUP_RESELLER_TOKEN and BACKUP_ADMIN_TOKEN"

    def __init__(
        self, base_url: str, reseller_token: str, admin_token: str, settings: HttpSettings, per_page: int = 100
    ):
        super().__init__(base_url, {"X-Reseller-Token": reseller_token}, settings)
        self._admin = {"X-Access-Token": admin_token}
        # Sent per call, not with the client's fixed headers: checked here so the error names the variable.
        problem = check_header_values(self._admin)
        if problem is not None:
            raise VendorError(f"{self.source_name}: {problem}: check BACKUP_ADMIN_TOKEN")
        remember_secret(admin_token)
        self.per_page = per_page

    async def owners(self) -> Page:
        """Every organization owner, each carrying the ``authentication_token`` for its own calls."""
        body = await self.get_json("/users", headers=self._admin)
        endpoint = Endpoint(self.source_name, "/users")
        if not isinstance(body, list):
            raise MalformedResponseError(f"{endpoint.describe()}: expected a list of owners")
        owners = require_fields(body, OWNER_REQUIRED, endpoint)
        for owner in owners:  # learned from the vendor: scrubbed from whatever it sends back (rule 19)
            remember_secret(str(owner["authentication_token"]))
        return endpoint, owners

    async def owner_detail(self, owner_id: str) -> Page:
        """The owner's full record; the only place ``organization_name`` appears."""
        path = f"/users/{path_segment(owner_id)}"
        body = await self.get_json(path, headers=self._admin)
        endpoint = Endpoint(self.source_name, path)
        return endpoint, require_fields([body], OWNER_DETAIL_REQUIRED, endpoint)

    async def _collection(
        self, path: str, token: str, params: dict[str, Any], required: tuple[str, ...]
    ) -> list[Page]:
        headers = {"X-Access-Token": token}

        def where(page: int, per_page: int) -> Endpoint:
            # Pages after the first overlap the previous one (paging.next_window), so their size varies.
            shown = path if per_page == self.per_page else f"{path}?per_page={per_page}"
            return Endpoint(self.source_name, shown, page)

        pager = BackupPager(where, self.per_page, self.settings.max_pages)
        pages: list[Page] = []
        while (request := pager.next) is not None:
            body = await self.get_json(path, params={**params, "page": request.page, "per_page": request.per_page},
                                       headers=headers, page=request.page)
            taken = pager.take(body)
            if taken is not None:
                endpoint, data = taken
                pages.append((endpoint, require_fields(data, required, endpoint)))
        return pages

    async def tenant_pages(self, owner_id: str, owner_token: str) -> list[Page]:
        path = f"/users/{path_segment(owner_id)}/tenants"
        return await self._collection(path, owner_token, {}, TENANT_REQUIRED)

    async def account_pages(self, owner_id: str, owner_token: str, tenant_id: Any, tenant_type: str) -> list[Page]:
        # The vendor answers 401 when `type` differs from the tenant's own type.
        path = f"/users/{path_segment(owner_id)}/tenants/{path_segment(tenant_id)}/accounts"
        return await self._collection(path, owner_token, {"type": tenant_type}, ACCOUNT_REQUIRED)


class BackupApiResource(VendorApiResource):
    """Source B. Unset ``base_url`` means the source is skipped for the run."""

    source_label: ClassVar[str] = "source B"
    env_fields: ClassVar[dict[str, str]] = {"base_url": "BACKUP_API_BASE_URL",
                                            "reseller_token": "BACKUP_RESELLER_TOKEN",
                                            "admin_token": "BACKUP_ADMIN_TOKEN"}

    base_url: str | None = Field(default=None, description="BACKUP_API_BASE_URL, e.g. https://host/api")
    reseller_token: str | None = Field(default=None, description="BACKUP_RESELLER_TOKEN (X-Reseller-Token).")
    admin_token: str | None = Field(default=None, description="BACKUP_ADMIN_TOKEN (X-Access-Token for GET /users).")
    per_page: int = Field(default=100, ge=1, le=100, description="Items per page (the vendor's maximum is 100).")

    def client(self) -> BackupClient:
        if not self.is_configured:
            raise VendorError(
                "source B is not configured: set BACKUP_API_BASE_URL, BACKUP_RESELLER_TOKEN and BACKUP_ADMIN_TOKEN"
            )
        reseller_token, admin_token = self.deployed("reseller_token"), self.deployed("admin_token")
        missing = [name for name, value in (("BACKUP_RESELLER_TOKEN", reseller_token),
                                            ("BACKUP_ADMIN_TOKEN", admin_token)) if not value]
        if missing:
            raise VendorError(f"BACKUP_API_BASE_URL is set but {' and '.join(missing)} is empty")
        base_url = validate_base_url(self.url or "", "BACKUP_API_BASE_URL")
        return BackupClient(base_url, reseller_token or "", admin_token or "", self.http_settings(), self.per_page)
