"""One `nightly_refresh` run in this process, as the schedule runs it; prints what bench/run.py measures.

Run by bench/run.py with the simulator's variables and a fresh M365_DATA_DIR in the environment.
Prints one JSON line: wall times (imports, the job incl. Dagster's overhead), every step's wall time
from Dagster's own STEP_START/STEP_SUCCESS events, the raw assets' vendor-call counters, and this
process's peak RSS (DuckDB runs inside it, so this is the pipeline's whole footprint).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

started = time.monotonic()

# Imported after the clock starts: the import time is one of the figures.
from dagster import DagsterEventType, DagsterInstance  # noqa: E402

from m365_pipeline.definitions import defs  # noqa: E402


def main() -> int:
    imported = time.monotonic()
    job = defs().resolve_job_def("nightly_refresh")
    with DagsterInstance.ephemeral() as instance:
        job_started = time.monotonic()
        result = job.execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {
                "log_level": os.environ.get("BENCH_LOG_LEVEL", "WARNING")}}}},
        )
        job_s = time.monotonic() - job_started
        steps: dict[str, dict[str, float]] = {}
        vendor: dict[str, dict[str, float]] = {}
        for entry in instance.all_logs(result.run_id):
            event = entry.dagster_event
            if event is None or not entry.step_key:
                continue
            step = steps.setdefault(entry.step_key, {})
            if event.event_type == DagsterEventType.STEP_START:
                step["start"] = entry.timestamp
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                step["end"] = entry.timestamp
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                metadata = event.step_materialization_data.materialization.metadata
                if "vendor_calls" in metadata:
                    vendor[entry.step_key] = {name: metadata[name].value
                                              for name in ("vendor_calls", "vendor_retries", "elapsed_s")}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "success": result.success,
        "import_s": imported - started,
        "job_s": job_s,
        "process_s": time.monotonic() - started,
        "steps": {key: {"start": s.get("start"), "end": s.get("end")} for key, s in steps.items()},
        "vendor": vendor,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }), flush=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
