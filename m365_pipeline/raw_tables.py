"""The raw layer's tables, defined once: every vendor field we keep, its DuckDB type and meaning.

The raw assets (``assets/raw.py``) land into them, ``duckdb_helpers`` derives ``last_collected``
from them, the core layer derives its dependencies from them, and the tests build fixtures from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import TableColumn, TableSchema

from m365_pipeline.landing import snake_case


@dataclass(frozen=True)
class Column:
    vendor_key: str
    sql_type: str
    description: str

    @property
    def name(self) -> str:
        return snake_case(self.vendor_key)


@dataclass(frozen=True)
class RawTable:
    """A raw table: the vendor's fields (snake_cased), our context columns, and ``collected_at``."""

    schema: str
    name: str
    row_means: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column_schema(self) -> TableSchema:
        cols = [TableColumn(c.name, c.sql_type, description=c.description) for c in self.columns]
        cols.append(TableColumn("collected_at", "TIMESTAMPTZ",
                                description="When this run's pull from the vendor started (UTC)."))
        return TableSchema(columns=cols)

    def _reader_columns(self) -> str:
        # Built only from the constants above, never from vendor data.
        pairs = [f"'{c.vendor_key}': '{c.sql_type}'" for c in self.columns]
        return "{" + ", ".join(pairs) + "}"

    def _select_list(self) -> str:
        return ", ".join(f'"{c.vendor_key}" AS {c.name}' for c in self.columns)

    def load_sql(self) -> str:
        return (
            f"CREATE OR REPLACE TABLE {self.qualified} AS "
            f"SELECT {self._select_list()}, ?::TIMESTAMPTZ AS collected_at "
            f"FROM read_json(?, format = 'newline_delimited', columns = {self._reader_columns()})"
        )



_V = "VARCHAR"
_B = "BOOLEAN"
_N = "DOUBLE"
_I = "BIGINT"
_J = "JSON"

SAAS_USERS = RawTable("raw", "saas_users", "one user as source S lists it (GET /users)", (
    Column("id", _V, "Source S user id."),
    Column("username", _V, "Sign-in name; the user's UPN when not empty."),
    Column("email", _V, "Email address; the UPN when username is empty."),
    Column("displayName", _V, "Display name."),
    Column("country", _V, "Country."),
    Column("department", _V, "Department."),
    Column("status", _V, "Vendor status, e.g. Active."),
    Column("isEnabled", _B, "Account enabled."),
    Column("isInReview", _B, "Flagged for review."),
    Column("isOnline", _B, "Online."),
    Column("isQualified", _B, "Qualified."),
    Column("licenseCount", _I, "Licenses the vendor counts for the user."),
    Column("potentialSavings", _N, "Vendor's potential savings estimate."),
    Column("userCostPerMonth", _N, "Vendor's monthly cost estimate."),
    Column("createdDate", _V, "Created (ISO 8601 as sent)."),
    Column("lastActive", _V, "Last active (ISO 8601 as sent)."),
    Column("discoveryTypes", _J, "Discovery types object as sent."),
))

SAAS_USER_SUBSCRIPTIONS = RawTable(
    "raw", "saas_user_subscriptions",
    "one subscription held by one source S user (GET /users/{id}/subscriptions)", (
        Column("user_id", _V, "Source S user id the subscription belongs to."),
        Column("id", _V, "Subscription id."),
        Column("applicationId", _V, "Application id."),
        Column("applicationName", _V, "Application (license) name; `name` stands in when empty."),
        Column("name", _V, "Subscription name."),
        Column("vendor", _V, "Vendor, e.g. Microsoft Corporation."),
        Column("vendorId", _V, "Vendor id."),
        Column("discoverySource", _V, "How the vendor discovered it."),
        Column("discoveryType", _I, "Discovery type code."),
        Column("firstDiscovered", _V, "First discovered (ISO 8601 as sent)."),
        Column("lastActivity", _V, "Last activity (ISO 8601 as sent)."),
        Column("potentialSavings", _N, "Potential savings estimate."),
        Column("totalCostPerMonth", _N, "Monthly cost estimate."),
    ),
)

BACKUP_ORGANIZATIONS = RawTable(
    "raw", "backup_organizations",
    "one organization owner of source B (GET /users joined with GET /users/{id}); tokens removed", (
        Column("id", _V, "Owner id, e.g. 26561-14."),
        Column("organization_name", _V, "Organization name exactly as the vendor gives it."),
        Column("organization_id", _V, "Vendor organization id."),
        Column("email", _V, "Owner email."),
        Column("plan_id", _V, "Plan id."),
        Column("external_id", _V, "External id."),
        Column("notification_email", _J, "Notification addresses."),
        Column("is_business", _B, "Business account."),
        Column("admin", _B, "Admin."),
        Column("customer_deactivated", _B, "Customer deactivated."),
        Column("login_disabled", _B, "Login disabled."),
        Column("flg_suspended", _B, "Suspended."),
        Column("archive", _B, "Archiver product."),
        Column("auto_license", _B, "Auto-license new mailboxes."),
        Column("seats_used", _I, "Seats used."),
        Column("seats_available", _I, "Seats available."),
        Column("active_seats", _I, "Active seats."),
        Column("deactivated_seats", _I, "Deactivated seats."),
        Column("required_seats", _I, "Required seats."),
        Column("paid_shared_mailboxes", _I, "Paid shared mailboxes."),
        Column("free_shared_mailboxes", _I, "Free shared mailboxes."),
        Column("storage_used", _N, "Storage used."),
        Column("storage_available", _N, "Storage available."),
        Column("backup_summary", _J, "Backup summary as sent."),
    ),
)

BACKUP_TENANTS = RawTable(
    "raw", "backup_tenants", "one tenant (backup domain) of one owner (GET /users/{id}/tenants)", (
        Column("owner_id", _V, "Owner id the tenant was listed under."),
        Column("id", _V, "Tenant id."),
        Column("organization_id", _V, "Vendor organization id."),
        Column("domain", _V, "Tenant domain."),
        Column("type", _V, "m365 or gws (Google Workspace, never counted)."),
        Column("status", _I, "Vendor status code (7 = completed)."),
        Column("total_users", _I, "Users the vendor counts in the tenant."),
        Column("created_at", _V, "Created (ISO 8601 as sent)."),
        Column("updated_at", _V, "Updated (ISO 8601 as sent)."),
    ),
)

BACKUP_ACCOUNTS = RawTable(
    "raw", "backup_accounts",
    "one mailbox or public folder of one tenant (GET /users/{id}/tenants/{tenant_id}/accounts)", (
        Column("owner_id", _V, "Owner id."),
        Column("tenant_id", _V, "Tenant id."),
        Column("upn", _V, "User principal name as sent (not normalised)."),
        Column("email", _V, "Email address."),
        Column("name", _V, "Display name."),
        Column("mailbox", _B, "true = mailbox, false = public folder."),
        Column("licensed", _B, "true = licensed, null = unlicensed."),
        Column("status", _V, "Backup status: active, available, excluded."),
        Column("type", _V, "Tenant type of the account: m365 or gws."),
        Column("tenant_status", _V, "GWS tenant status; null for M365."),
        Column("created_at", _V, "Created (ISO 8601 as sent)."),
        Column("updated_at", _V, "Updated (ISO 8601 as sent)."),
    ),
)


RAW_TABLES = (SAAS_USERS, SAAS_USER_SUBSCRIPTIONS, BACKUP_ORGANIZATIONS, BACKUP_TENANTS, BACKUP_ACCOUNTS)
