"""The code location: every asset, check, resource, job and schedule of m365-pipeline.

Dagster loads ``defs`` (``[tool.dagster]`` and ``workspace.yaml`` name this module). Importing the
module does nothing else: the environment is read, and ``.env`` loaded, only when ``defs`` is built.
"""

import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from dagster import (
    AssetsDefinition,
    AssetSelection,
    Backoff,
    BetaWarning,
    DagsterRunStatus,
    DefaultScheduleStatus,
    Definitions,
    In,
    Jitter,
    OpDefinition,
    Out,
    RetryPolicy,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
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
from m365_pipeline.sensors import alert_sensors
from m365_pipeline.settings import DUCKDB_FILE, data_dir, load_env_file, schedule_timezone

NIGHTLY_JOB = "nightly_refresh"
NIGHTLY_SCHEDULE = "nightly_refresh_at_2300"
# A failed night is re-executed once from the failed step: an outage, a killed run worker. A night a
# blocking check held back is not (its checks tag the run, m365_pipeline/run_retries.py).
NIGHTLY_TAGS = {"dagster/max_retries": 1, "dagster/retry_strategy": "FROM_FAILURE"}
# The Dagster concurrency pool of every step that opens the working DuckDB file: deploy/dagster.yaml
# gives it one slot, so across all runs of the instance one such step runs at a time (the UI shows the
# pool on each asset and its slots under Deployment > Concurrency). The data directory's flock
# (m365_pipeline/run_lock.py, taken while a connection is open) is the backstop for runs outside it.
DUCKDB_POOL = "m365_duckdb"
DUCKDB_RESOURCE = "duckdb"
Node = TypeVar("Node", bound=AssetsDefinition)  # an asset or an asset check (AssetChecksDefinition)
IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
               DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def nightly_tick(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    """Start the night, unless a run is still going or queued: it would only wait behind it and pull twice."""
    busy = context.instance.get_run_records(RunsFilter(statuses=IN_PROGRESS), limit=1)
    if busy:
        run = busy[0].dagster_run
        started = busy[0].start_time or busy[0].create_timestamp.timestamp()
        return SkipReason(f"run {run.run_id} of {run.job_name} ({run.status.value}, since "
                          f"{datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M:%S} UTC) is still in progress")
    return RunRequest()


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
        tags=NIGHTLY_TAGS,
    )
    nightly_schedule = ScheduleDefinition(
        name=NIGHTLY_SCHEDULE,
        job=nightly_refresh,
        cron_schedule="0 23 * * *",
        execution_timezone=schedule_timezone(),
        default_status=DefaultScheduleStatus.RUNNING,
        execution_fn=nightly_tick,
        description="Every day at 23:00 in M365_SCHEDULE_TIMEZONE (default UTC), as the dashboard document says; "
                    "skipped while a run is in progress.",
    )
    return Definitions(
        assets=in_duckdb_pool([*raw_assets, *core_assets, *marts_assets, *coverage_assets, *export_assets]),
        asset_checks=in_duckdb_pool([*core_checks, *marts_checks, *coverage_checks]),
        jobs=[nightly_refresh],
        schedules=[nightly_schedule],
        sensors=alert_sensors,
        # URLs and tokens stay bound to their variables whatever run config changes (resources/base.py).
        resources=pipeline_resources(SaasApiResource.from_environment(), BackupApiResource.from_environment(),
                                     data_dir() / DUCKDB_FILE),
        executor=in_process_executor,
    )


def in_duckdb_pool(nodes: list[Node]) -> list[Node]:
    """``nodes`` with every one that requires the ``duckdb`` resource put in DUCKDB_POOL.

    Done here, once, rather than by ``pool=`` on each decorator, so no asset or check that writes the
    file can be added without it. Dagster has no public way to set the pool of a built asset; this
    rebuilds its op with every attribute kept and the pool set (test_definitions.py proves the pool
    is on every such step of the loaded code location, so a Dagster upgrade that breaks it fails there).
    """
    return [_in_pool(node, DUCKDB_POOL) if DUCKDB_RESOURCE in node.required_resource_keys else node
            for node in nodes]


def _in_pool(node: Node, pool: str) -> Node:
    op = node.op
    if op.pool is not None and op.pool != pool:
        raise ValueError(f"{op.name} is in pool {op.pool!r}; the DuckDB steps share {pool!r}")
    pooled = OpDefinition.dagster_internal_init(
        name=op.name, compute_fn=op.compute_fn, description=op.description, config_schema=op.config_schema,
        ins={d.name: In.from_definition(d) for d in op.input_defs},
        outs={d.name: Out.from_definition(d) for d in op.output_defs},
        required_resource_keys=op.required_resource_keys, tags=op.tags, version=None,
        retry_policy=op.retry_policy, code_version=op.version, pool=pool)
    with warnings.catch_warnings():  # the attributes it passes back include a beta one (execution_type)
        warnings.simplefilter("ignore", BetaWarning)
        return type(node)(**{**node.get_attributes_dict(), "node_def": pooled})


def pipeline_resources(saas: SaasApiResource, backup: BackupApiResource, database: Path) -> dict[str, Any]:
    """The resources every run gets (the tests' runs too): the two sources, the working DuckDB file with
    its run lock and data-directory checks (WarehouseResource), and the publish policy."""
    return {
        "saas": saas,
        "backup": backup,
        # DuckDB takes up to 80 % of RAM by default; capped, it spills to <db>.tmp instead
        # (peak memory with and without the cap: bench/RESULTS.md).
        "duckdb": WarehouseResource(database=str(database), connection_config={"memory_limit": "1GB"}),
        "publish_policy": PublishPolicy(),
    }
