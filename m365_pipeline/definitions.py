"""The code location: every asset, check, resource, job and schedule of m365-pipeline.

Dagster loads ``defs`` (``[tool.dagster]`` and ``workspace.yaml`` name this module). Importing the
module does nothing else: the environment is read, and ``.env`` loaded, only when ``defs`` is built.
"""

from dagster import (
    AssetSelection,
    Backoff,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    Jitter,
    RetryPolicy,
    ScheduleDefinition,
    define_asset_job,
    definitions,
    in_process_executor,
)

from m365_pipeline.assets.core import core_assets, core_checks
from m365_pipeline.assets.coverage import coverage_assets, coverage_checks
from m365_pipeline.assets.export import export_assets
from m365_pipeline.assets.marts import marts_assets, marts_checks
from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.resources import BackupApiResource, PublishPolicy, SaasApiResource, WarehouseResource
from m365_pipeline.settings import DUCKDB_FILE, data_dir, env_is_set, load_env_file, schedule_timezone

NIGHTLY_JOB = "nightly_refresh"
NIGHTLY_SCHEDULE = "nightly_refresh_at_2300"


def optional_env(name: str) -> EnvVar | None:
    """An EnvVar when the variable is set, so the Dagster UI shows its name, never its value."""
    return EnvVar(name) if env_is_set(name) else None


@definitions
def defs() -> Definitions:
    load_env_file()
    nightly_refresh = define_asset_job(
        name=NIGHTLY_JOB,
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
        name=NIGHTLY_SCHEDULE,
        job=nightly_refresh,
        cron_schedule="0 23 * * *",
        execution_timezone=schedule_timezone(),
        default_status=DefaultScheduleStatus.RUNNING,
        description="Every day at 23:00 in M365_SCHEDULE_TIMEZONE (default UTC), as the dashboard document says.",
    )
    return Definitions(
        assets=[*raw_assets, *core_assets, *marts_assets, *coverage_assets, *export_assets],
        asset_checks=[*core_checks, *marts_checks, *coverage_checks],
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
            # DuckDB takes up to 80 % of RAM by default; capped, it spills to <db>.tmp instead
            # (peak memory with and without the cap: bench/RESULTS.md).
            "duckdb": WarehouseResource(database=str(data_dir() / DUCKDB_FILE),
                                        connection_config={"memory_limit": "1GB"}),
            "publish_policy": PublishPolicy(),
        },
        executor=in_process_executor,
    )
