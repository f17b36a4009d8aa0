"""The sensors that turn a failed, held-back or missed night into an alert (m365_pipeline/alerts.py).

They run in ``dagster-daemon`` and see every run of this instance: the schedule's, the UI's and the
README's CLI run (which carries no code location, hence ``monitor_all_code_locations``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from m365_pipeline.alerts import MISSED_AFTER_HOURS, WEBHOOK_VARIABLE, Alert, send
from m365_pipeline.publishing import export_dir, published_manifest
from m365_pipeline.settings import data_dir

HELD_BACK_ERROR = "DagsterAssetCheckFailedError"  # what Dagster raises when a blocking check fails
FAILURE_SENSOR = "alert_on_failed_night"
# What run monitoring says when it stops a run at its time limit (dagster/_daemon/monitoring/run_monitoring.py).
OVER_TIME = re.compile(r"exceeding maximum runtime of (\d+) seconds|Exceeded maximum runtime of (\d+) seconds")


def over_time_limit(instance: DagsterInstance, run: DagsterRun, run_failure_message: str) -> int | None:
    """The time limit (seconds) run monitoring stopped this run at, or None if it did not."""
    texts = [run_failure_message, *(entry.dagster_event.message or "" for entry in instance.all_logs(
        run.run_id, of_type={DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_FAILURE}) if entry.dagster_event)]
    for text in texts:
        if match := OVER_TIME.search(text):
            return int(match[1] or match[2])
    return None


def step_in_progress(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """The step that had started and not ended when the run stopped (a stopped step records no failure)."""
    started: dict[str, None] = {}
    for entry in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                                                        DagsterEventType.STEP_FAILURE}):
        if (event := entry.dagster_event) and event.step_key:
            if event.event_type == DagsterEventType.STEP_START:
                started[event.step_key] = None
            else:
                started.pop(event.step_key, None)
    return next(reversed(started), None)


def over_time_reason(limit_s: int, step: str | None) -> str:
    """A night that did not fit: the limit, where it was, and the setting to change."""
    where = f" during {step}" if step else ""
    return (f"the night did not fit in its time limit: run monitoring stopped it after {limit_s} s "
            f"({limit_s / 3600:.1f} h){where}. Raise run_monitoring.max_runtime_seconds in dagster.yaml (or the "
            "run's dagster/max_runtime_seconds tag); the README's \"How long a night takes\" gives the pull's "
            "duration per vendor rate. The previous data stays published.")


def failure_alert(instance: DagsterInstance, run: DagsterRun, step_failures: Sequence[DagsterEvent],
                  run_failure_message: str) -> Alert:
    """A held-back night (a blocking check failed) or a failed one, with the step and the reason."""
    held = [event for event in step_failures
            if event.step_failure_data.error and event.step_failure_data.error.cls_name == HELD_BACK_ERROR]
    if held:
        failed_checks = [
            evaluation for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
            if entry.dagster_event and not (evaluation := entry.dagster_event.event_specific_data).passed
            and evaluation.blocking
        ]
        reason = "; ".join(f"{e.check_name}: {e.description or 'failed'}" for e in failed_checks) \
            or "a blocking check failed"
        return Alert("held_back", f"{reason}. The previous data stays published.", run.job_name, run.run_id,
                     ", ".join(event.step_key or "" for event in held))
    if (limit_s := over_time_limit(instance, run, run_failure_message)) is not None:
        step = step_failures[0].step_key if step_failures else step_in_progress(instance, run)
        return Alert("failed", over_time_reason(limit_s, step), run.job_name, run.run_id, step)
    if step_failures:
        data = step_failures[0].step_failure_data
        reason = (data.user_failure_data.description if data.user_failure_data and data.user_failure_data.description
                  else data.error.message.strip() if data.error else "the step failed")
        return Alert("failed", reason, run.job_name, run.run_id, step_failures[0].step_key)
    return Alert("failed", run_failure_message, run.job_name, run.run_id)


@run_failure_sensor(name=FAILURE_SENSOR, monitor_all_code_locations=True, minimum_interval_seconds=30,
                    default_status=DefaultSensorStatus.RUNNING,
                    description=f"POSTs an alert to {WEBHOOK_VARIABLE} for a failed or held-back run.")
def alert_on_failed_night(context: RunFailureSensorContext) -> None:
    run = context.dagster_run
    if run.tags.get("dagster/will_retry") == "true":
        context.log.info(f"run {run.run_id} will be retried; the retry's outcome is what gets reported")
        return
    alert = failure_alert(context.instance, run, context.get_step_failure_events(), context.failure_event.message or "")
    if send(alert):
        context.log.info(f"sent a {alert.kind} alert for run {run.run_id}")


@sensor(name="alert_on_missed_night", minimum_interval_seconds=300, default_status=DefaultSensorStatus.RUNNING,
        description=f"POSTs an alert to {WEBHOOK_VARIABLE} when nothing was published for over "
                    f"{MISSED_AFTER_HOURS} hours (once per published version).")
def alert_on_missed_night(context: SensorEvaluationContext) -> SkipReason:
    manifest = published_manifest(export_dir(data_dir()))
    if manifest is None:
        return SkipReason("nothing has been published yet")
    published_at = datetime.strptime(manifest["published_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    age = datetime.now(UTC) - published_at
    if age <= timedelta(hours=MISSED_AFTER_HOURS):
        return SkipReason(f"last published {age.total_seconds() / 3600:.1f} h ago")
    if context.cursor == manifest["version"]:
        return SkipReason(f"already alerted for version {manifest['version']}")
    alert = Alert("missed", f"the published data is version {manifest['version']} from {manifest['published_at']}, "
                            f"{age.total_seconds() / 3600:.0f} h ago: no night has been published since. Check "
                            "the schedule, the daemon and the last runs.")
    if send(alert):
        context.update_cursor(manifest["version"])
        return SkipReason(f"sent a missed-night alert for version {manifest['version']}")
    return SkipReason(f"{WEBHOOK_VARIABLE} is not set")


alert_sensors = [alert_on_failed_night, alert_on_missed_night]
