"""The code location: every asset, check, resource, job and schedule of m365-pipeline."""

from dagster import (
    AssetSelection,
    Backoff,
    DefaultScheduleStatus,
    Definitions,
    Jitter,
    RetryPolicy,
    ScheduleDefinition,
    define_asset_job,
    in_process_executor,
)
from dagster_duckdb import DuckDBResource

from m365_pipeline.assets.core import core_assets, core_checks
from m365_pipeline.assets.export import export_assets
from m365_pipeline.assets.marts import PublishPolicy, marts_assets, marts_checks
from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.resources import BackupApiResource, SaasApiResource
from m365_pipeline.settings import DUCKDB_FILE, data_dir, load_env_file, optional_env, schedule_timezone

load_env_file()
DATA_DIR = data_dir()
DATA_DIR.mkdir(parents=True, exist_ok=True)

nightly_refresh = define_asset_job(
    name="nightly_refresh",
    selection=AssetSelection.all(),
    description="Pull both vendors, rebuild core and marts, publish the Dashboard API and the analytics copy.",
    # Steps take milliseconds; a process per step would cost ~2 s each.
    executor_def=in_process_executor,
    # A vendor outage (5xx, 429, timeouts past the client's own retries) is retried a few minutes
    # later; bad credentials or malformed data fail at once (Failure(allow_retries=False)).
    op_retry_policy=RetryPolicy(max_retries=2, delay=120, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS),
    tags={"dagster/max_retries": 1, "dagster/retry_strategy": "FROM_FAILURE"},
)

nightly_schedule = ScheduleDefinition(
    name="nightly_refresh_at_2300",
    job=nightly_refresh,
    cron_schedule="0 23 * * *",
    execution_timezone=schedule_timezone(),
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every day at 23:00 in M365_SCHEDULE_TIMEZONE (default UTC), as the dashboard document says.",
)

defs = Definitions(
    assets=[*raw_assets, *core_assets, *marts_assets, *export_assets],
    asset_checks=[*core_checks, *marts_checks],
    jobs=[nightly_refresh],
    schedules=[nightly_schedule],
    resources={
        "saas": SaasApiResource(
            base_url=optional_env("SAAS_API_BASE_URL"),
            token=optional_env("SAAS_API_TOKEN"),
        ),
        "backup": BackupApiResource(
            base_url=optional_env("BACKUP_API_BASE_URL"),
            reseller_token=optional_env("BACKUP_RESELLER_TOKEN"),
            admin_token=optional_env("BACKUP_ADMIN_TOKEN"),
        ),
        # DuckDB takes up to 80 % of RAM by default: at 1M users core.license_assignments peaked at
        # 1.9 GiB RSS; capped, it spills to <db>.tmp and the run peaks at 1.2 GiB for +0.7 s (bench/RESULTS.md).
        "duckdb": DuckDBResource(database=str(DATA_DIR / DUCKDB_FILE), connection_config={"memory_limit": "1GB"}),
        "publish_policy": PublishPolicy(),
    },
    executor=in_process_executor,
)
