"""The simulator alone, driven by the project's own source S client: per-user subscription calls/s.

Run by bench/run.py against a running simulator (its variables in the environment):
``python bench/client_probe.py USERS CONCURRENCY``. Lists USERS user ids first (not timed), then
fetches each user's subscriptions exactly as raw.saas_user_subscriptions does (SaasClient on the
bounded pool of run_concurrently), without staging. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from m365_pipeline.resources import SaasApiResource
from m365_pipeline.resources.http import run_concurrently


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    users, concurrency = int(sys.argv[1]), int(sys.argv[2])
    resource_ = SaasApiResource(base_url=os.environ["SAAS_API_BASE_URL"], token=os.environ["SAAS_API_TOKEN"],
                                concurrency=concurrency)
    with resource_.client() as client:
        ids: list[str] = []
        for _, items in client.user_pages():
            ids.extend(item["id"] for item in items)
            if len(ids) >= users:
                break
        ids = ids[:users]
        calls_before = client.stats.calls
        started, cpu_started = time.monotonic(), cpu_s()
        run_concurrently(ids, client.subscription_pages, workers=concurrency, on_result=lambda *_: None,
                         pace=client.pace)
        wall, cpu = time.monotonic() - started, cpu_s() - cpu_started
        calls = client.stats.calls - calls_before
    print(json.dumps({"users": len(ids), "concurrency": concurrency, "calls": calls, "wall_s": wall,
                      "calls_per_s": calls / wall, "client_cpu_ms_per_call": cpu / calls * 1000,
                      **{k: v for k, v in client.stats.as_metadata().items()
                         if k in ("vendor_429s", "concurrency_peak", "concurrency_final")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
