"""Which failed nights Dagster's run retries try again.

The nightly job carries ``dagster/max_retries``, so the daemon re-executes a failed run: right
for an outage or a killed run worker, wasted on a night that fails the same way every time (a
blocking check holding bad numbers back, bad credentials). Dagster decides when the run fails,
from the run's ``dagster/retry_on_asset_or_op_failure`` tag; a step that knows retrying cannot
help sets it to false on its own run first.
"""

from __future__ import annotations

from typing import Any

RETRY_ON_STEP_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"


def do_not_retry_this_run(context: Any) -> None:
    """Mark the running run so its failure is not retried (an asset or asset-check context)."""
    do_not_retry_run(context.instance, context.run.run_id)


def do_not_retry_run(instance: Any, run_id: str) -> None:
    instance.add_run_tags(run_id, {RETRY_ON_STEP_FAILURE_TAG: "false"})
