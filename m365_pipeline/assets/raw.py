"""Raw layer: the two vendors' records as they came, one table per endpoint.

Vendor fields are kept (snake_cased), credentials are dropped, ``collected_at`` is
added, and each table is replaced whole per run. A source that is not configured is
skipped: its tables are emptied, never left stale.
"""


import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset
from dagster_duckdb import DuckDBResource

from m365_pipeline.crashpoints import crash_point
from m365_pipeline.duckdb_helpers import ensure_schema, markdown_preview
from m365_pipeline.landing import StagingFile
from m365_pipeline.raw_tables import (
    BACKUP_ACCOUNTS,
    BACKUP_ORGANIZATIONS,
    BACKUP_TENANTS,
    SAAS_USER_SUBSCRIPTIONS,
    SAAS_USERS,
    RawTable,
)
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.resources.base import VendorApiResource
from m365_pipeline.resources.http import CallStats, Page, VendorError, VendorNotFoundError, run_concurrently, run_pull
from m365_pipeline.resources.paging import ListRead, read_again_if_shifted, read_until_consistent
from m365_pipeline.settings import STAGING_DIR

GROUP = "raw"
NEITHER_CONFIGURED = (
    "No vendor source is configured, so there is nothing to pull. Set SAAS_API_BASE_URL and "
    "SAAS_API_TOKEN (source S) and/or BACKUP_API_BASE_URL, BACKUP_RESELLER_TOKEN and "
    "BACKUP_ADMIN_TOKEN (source B), in the environment or in a .env file. To try the pipeline "
    "without a vendor account, start the simulator (`m365-simulate`) and export the variables "
    "it prints."
)

def _asset_kwargs(table: RawTable) -> dict[str, Any]:
    return {
        "key_prefix": [table.schema],
        "name": table.name,
        "group_name": GROUP,
        "kinds": {"duckdb"},
        "description": f"One row = {table.row_means}.",
        "metadata": {
            "dagster/column_schema": table.column_schema(),
            "dagster/table_name": table.qualified,
        },
    }


class _Progress:
    """Logs long pulls every few seconds so a watcher sees them move."""

    def __init__(self, context: AssetExecutionContext, what: str, total: int, stats: CallStats,
                 every_s: float = 5.0):
        self.context, self.what, self.total, self.stats, self.every_s = context, what, total, stats, every_s
        self._last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done == self.total or now - self._last >= self.every_s:
            self._last = now
            pct = 100 * done / self.total if self.total else 100
            self.context.log.info(f"{self.what}: {done:,}/{self.total:,} ({pct:.0f}%), {self.stats.progress()}")


def _land(
    context: AssetExecutionContext,
    duckdb: DuckDBResource,
    table: RawTable,
    source: VendorApiResource,
    pull: Callable[[StagingFile], Awaitable[CallStats]],
) -> MaterializeResult:
    """Run ``pull`` into a staging file (on one event loop, entered once), then swap the table in one statement.

    A source that is not configured is not pulled: its table is emptied, never left stale.
    """
    collected_at = datetime.now(UTC).replace(microsecond=0)
    staging_dir = Path(duckdb.database).parent / STAGING_DIR
    metadata: dict[str, Any] = {}
    with StagingFile(staging_dir, table) as staging:
        if source.skip_reason:
            context.log.warning(f"{table.qualified}: {source.skip_reason}; the table is emptied, not left stale.")
            metadata["skipped"] = source.skip_reason
        else:
            try:
                stats = run_pull(pull(staging))
            except VendorError as exc:
                # Only an outage is worth the job's retry policy; bad credentials or data are not.
                raise Failure(description=f"{table.qualified}: {exc}", allow_retries=exc.transient) from None
            metadata.update(stats.as_metadata())
        with duckdb.get_connection() as conn:
            ensure_schema(conn, table.schema)
            try:
                rows = staging.load(conn, collected_at)
            except VendorError as exc:
                raise Failure(description=f"{table.qualified}: {exc}", allow_retries=False) from None
            preview = markdown_preview(conn, f"SELECT * EXCLUDE (collected_at) FROM {table.qualified} LIMIT 5")
    context.log.info(f"{table.qualified}: {rows:,} rows landed")
    return MaterializeResult(metadata={
        "dagster/row_count": rows,
        "collected_at": collected_at.isoformat().replace("+00:00", "Z"),
        **metadata,
        "preview": MetadataValue.md(preview),
    })


def _column_values(duckdb: DuckDBResource, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.get_connection() as conn:
        return conn.execute(sql).fetchall()


def _require_some_source(saas: SaasApiResource, backup: BackupApiResource) -> None:
    if not saas.is_configured and not backup.is_configured:
        raise Failure(description=NEITHER_CONFIGURED, allow_retries=False)


@asset(**_asset_kwargs(SAAS_USERS))
def saas_users(
    context: AssetExecutionContext, saas: SaasApiResource, backup: BackupApiResource, duckdb: DuckDBResource
) -> MaterializeResult:
    _require_some_source(saas, backup)

    async def pull(staging: StagingFile) -> CallStats:
        async with saas.client() as client:
            async def read_once(listing: ListRead) -> None:
                async for origin, items in client.user_pages(listing):
                    staging.add(items, origin=origin)
                    context.log.debug(f"{origin.describe()}: {len(items)} users")

            await read_until_consistent(read_once, staging.restart, context.log.warning, "source S GET /users")
            return client.stats

    return _land(context, duckdb, SAAS_USERS, saas, pull)


@asset(deps=[saas_users], **_asset_kwargs(SAAS_USER_SUBSCRIPTIONS))
def saas_user_subscriptions(
    context: AssetExecutionContext, saas: SaasApiResource, duckdb: DuckDBResource
) -> MaterializeResult:
    user_ids = [row[0] for row in _column_values(duckdb, "SELECT DISTINCT id FROM raw.saas_users ORDER BY id")]

    gone: list[str] = []

    async def pull(staging: StagingFile) -> CallStats:
        async with saas.client() as client:
            progress = _Progress(context, "subscriptions", len(user_ids), client.stats)
            fetch = _gone_on_404(client.subscription_pages, gone)

            def keep(user_id: str, pages: list[Page]) -> None:
                for origin, items in pages:
                    staging.add(items, origin=origin, user_id=user_id)

            await run_concurrently(user_ids, fetch, workers=saas.concurrency,
                                   on_result=_counting(keep, progress), pace=client.pace)
            _warn_gone(context, gone, "source S users", "GET /users", "their subscriptions")
            return client.stats

    result = _land(context, duckdb, SAAS_USER_SUBSCRIPTIONS, saas, pull)
    return _with_gone(result, gone)


@asset(**_asset_kwargs(BACKUP_ORGANIZATIONS))
def backup_organizations(
    context: AssetExecutionContext, saas: SaasApiResource, backup: BackupApiResource, duckdb: DuckDBResource
) -> MaterializeResult:
    _require_some_source(saas, backup)
    gone: list[str] = []

    async def pull(staging: StagingFile) -> CallStats:
        async with backup.client() as client:
            _, owners = await client.owners()
            progress = _Progress(context, "organization owners", len(owners), client.stats)

            def keep(owner: dict[str, Any], pages: list[Page]) -> None:
                for origin, (detail,) in pages:
                    staging.add([{**owner, **detail}], origin=origin)

            async def detail(owner: dict[str, Any]) -> list[Page]:
                return [await client.owner_detail(owner["id"])]

            fetch = _gone_on_404(detail, gone, label=lambda o: str(o["id"]))
            await run_concurrently(owners, fetch, workers=backup.concurrency, on_result=_counting(keep, progress),
                                   pace=client.pace)
            _warn_gone(context, gone, "organization owners", "source B GET /users", "their details")
            return client.stats

    return _with_gone(_land(context, duckdb, BACKUP_ORGANIZATIONS, backup, pull), gone)


async def _owner_tokens(client: Any) -> dict[str, str]:
    """Owner id -> its authentication token, fetched fresh (tokens are never stored)."""
    _, owners = await client.owners()
    return {str(owner["id"]): str(owner["authentication_token"]) for owner in owners}


@asset(deps=[backup_organizations], **_asset_kwargs(BACKUP_TENANTS))
def backup_tenants(
    context: AssetExecutionContext, backup: BackupApiResource, duckdb: DuckDBResource
) -> MaterializeResult:
    owner_ids = [row[0] for row in _column_values(duckdb, "SELECT id FROM raw.backup_organizations ORDER BY id")]
    gone: list[str] = []
    shifted: list[str] = []

    async def pull(staging: StagingFile) -> CallStats:
        async with backup.client() as client:
            tokens = await _owner_tokens(client)
            listed = _still_listed(owner_ids, tokens, gone, owner_of=str, label=str)
            progress = _Progress(context, "owners' tenants", len(listed), client.stats)

            async def fetch(owner_id: str) -> list[Page]:
                return await client.tenant_pages(owner_id, tokens[owner_id])

            def keep(owner_id: str, pages: list[Page]) -> None:
                for origin, items in pages:
                    staging.add(items, origin=origin, owner_id=owner_id)

            await run_concurrently(listed, _gone_on_404(_again_if_shifted(fetch, shifted), gone),
                                   workers=backup.concurrency, on_result=_counting(keep, progress), pace=client.pace)
            _warn_gone(context, gone, "organization owners", "source B GET /users", "their tenants")
            _warn_shifted(context, shifted)
            return client.stats

    return _with_gone(_land(context, duckdb, BACKUP_TENANTS, backup, pull), gone, shifted)


@asset(deps=[backup_tenants], **_asset_kwargs(BACKUP_ACCOUNTS))
def backup_accounts(
    context: AssetExecutionContext, backup: BackupApiResource, duckdb: DuckDBResource
) -> MaterializeResult:
    tenants = _column_values(duckdb, "SELECT owner_id, id, type FROM raw.backup_tenants ORDER BY owner_id, id")
    gone: list[str] = []
    shifted: list[str] = []

    async def pull(staging: StagingFile) -> CallStats:
        async with backup.client() as client:
            tokens = await _owner_tokens(client)
            listed = _still_listed(tenants, tokens, gone, owner_of=lambda t: str(t[0]), label=_tenant_label)
            progress = _Progress(context, "tenants' mailboxes", len(listed), client.stats)

            async def fetch(tenant: tuple[str, str, str]) -> list[Page]:
                owner_id, tenant_id, tenant_type = tenant
                return await client.account_pages(owner_id, tokens[owner_id], tenant_id, tenant_type)

            def keep(tenant: tuple[str, str, str], pages: list[Page]) -> None:
                for origin, items in pages:
                    staging.add(items, origin=origin, owner_id=tenant[0], tenant_id=tenant[1])

            await run_concurrently(listed, _gone_on_404(_again_if_shifted(fetch, shifted), gone, label=_tenant_label),
                                   workers=backup.concurrency, on_result=_counting(keep, progress), pace=client.pace)
            _warn_gone(context, gone, "tenants (owner/tenant)", "source B", "their mailboxes")
            _warn_shifted(context, shifted)
            return client.stats

    return _with_gone(_land(context, duckdb, BACKUP_ACCOUNTS, backup, pull), gone, shifted)


def _tenant_label(tenant: tuple[str, str, str]) -> str:
    return f"{tenant[0]}/{tenant[1]}"


def _still_listed(items: list[Any], tokens: dict[str, str], gone: list[str], owner_of: Callable[[Any], str],
                  label: Callable[[Any], str]) -> list[Any]:
    """The items whose owner source B still lists; the others' owner was deleted since it was listed: gone."""
    gone.extend(label(item) for item in items if owner_of(item) not in tokens)
    return [item for item in items if owner_of(item) in tokens]


Fetch = Callable[[Any], Awaitable[list[Page]]]


def _again_if_shifted(fetch: Fetch, shifted: list[str]) -> Fetch:
    """``fetch``, with a list that changed while it was paged read again (``paging.read_again_if_shifted``)."""
    async def fetch_again(item: Any) -> list[Page]:
        return await read_again_if_shifted(lambda: fetch(item), shifted.append)

    return fetch_again


def _warn_shifted(context: AssetExecutionContext, shifted: list[str]) -> None:
    for message in shifted[:10]:
        context.log.warning(f"{message}; it was read again")
    if len(shifted) > 10:
        context.log.warning(f"... and {len(shifted) - 10} more lists were read again")


def _gone_on_404(fetch: Fetch, gone: list[str], label: Callable[[Any], str] = str) -> Fetch:
    """``fetch``, with a record the vendor deleted after listing it (404) noted in ``gone`` and read as empty."""
    async def fetch_or_gone(item: Any) -> list[Page]:
        try:
            return await fetch(item)
        except VendorNotFoundError:
            gone.append(label(item))  # items run as tasks on one event loop: no lock needed
            return []

    return fetch_or_gone


def _warn_gone(context: AssetExecutionContext, gone: list[str], what: str, listed_by: str, read: str) -> None:
    if gone:
        shown = ", ".join(sorted(gone)[:10]) + (" ..." if len(gone) > 10 else "")
        context.log.warning(f"{len(gone)} {what} listed by {listed_by} were deleted at the vendor before {read} "
                            f"were read (HTTP 404); treated as gone: {shown}")


def _with_gone(result: MaterializeResult, gone: list[str], shifted: list[str] | None = None) -> MaterializeResult:
    extra = {"deleted_during_pull": len(gone)}
    if shifted is not None:
        extra["lists_read_again"] = len(shifted)
    return MaterializeResult(metadata={**(result.metadata or {}), **extra})


def _counting(keep: Callable[[Any, Any], None], progress: _Progress) -> Callable[[Any, Any], None]:
    done = 0

    def on_result(item: Any, result: Any) -> None:
        nonlocal done
        keep(item, result)
        done += 1
        progress(done)
        if done == progress.total // 2:
            crash_point("pull")

    return on_result


raw_assets = [saas_users, saas_user_subscriptions, backup_organizations, backup_tenants, backup_accounts]

