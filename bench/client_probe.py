"""The simulator alone, driven by the project's own source S client: per-user subscription calls/s.

Run by bench/run.py against a running simulator (its variables in the environment):
``python bench/client_probe.py USERS CONCURRENCY``, CONCURRENCY a number or ``default`` (the resource's own
default: a fixed 16 before issue 15, the ceiling of the adaptive limit since). Lists USERS user ids first (not
timed), then fetches each user's subscriptions exactly as raw.saas_user_subscriptions does (SaasClient on
run_concurrently), without staging. Prints one JSON line. Works with older clients too (bench/pace.py runs
the ones from before from an extracted copy on PYTHONPATH): synchronous ones (before issue 24) and the async
one (``run_pull``).
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import sys
import time
from contextlib import aclosing
from typing import Any

from m365_pipeline.resources import SaasApiResource
from m365_pipeline.resources.http import run_concurrently

try:
    from m365_pipeline.resources.http import run_pull
except ImportError:  # a client from before issue 24: synchronous
    run_pull = None


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    users = int(sys.argv[1])
    settings: dict[str, Any] = {} if sys.argv[2] == "default" else {"concurrency": int(sys.argv[2])}
    resource_ = SaasApiResource(base_url=os.environ["SAAS_API_BASE_URL"], token=os.environ["SAAS_API_TOKEN"],
                                **settings)
    result = run_pull(probe_async(resource_, users)) if run_pull else probe_sync(resource_, users)
    print(json.dumps(result), flush=True)
    return 0


def report(resource_: SaasApiResource, client: Any, ids: list[str], items: int, before: tuple[int, int],
           wall: float, cpu: float) -> dict[str, Any]:
    calls = client.stats.calls - before[0]
    meta = client.stats.as_metadata()
    return {"users": len(ids), "concurrency": resource_.concurrency, "calls": calls, "wall_s": wall,
            "calls_per_s": calls / wall, "users_per_s": len(ids) / wall,
            "client_cpu_ms_per_call": cpu / calls * 1000, "retries": client.stats.retries - before[1],
            "subscriptions": items,
            **{k: v for k, v in meta.items() if k in ("vendor_429s", "concurrency_peak", "concurrency_final")}}


async def probe_async(resource_: SaasApiResource, users: int) -> dict[str, Any]:
    async with resource_.client() as client:
        ids: list[str] = []
        async with aclosing(client.user_pages()) as pages:  # the pages asked for ahead are cancelled
            async for _, items in pages:
                ids.extend(item["id"] for item in items)
                if len(ids) >= users:
                    break
        ids = ids[:users]
        before = client.stats.calls, client.stats.retries
        items = 0

        def count(_: str, pages: list[Any]) -> None:
            nonlocal items
            items += sum(len(page_items) for _, page_items in pages)

        started, cpu_started = time.monotonic(), cpu_s()
        await run_concurrently(ids, client.subscription_pages, workers=resource_.concurrency, on_result=count,
                               pace=client.pace)
        return report(resource_, client, ids, items, before, time.monotonic() - started, cpu_s() - cpu_started)


def probe_sync(resource_: SaasApiResource, users: int) -> dict[str, Any]:
    with resource_.client() as client:
        ids: list[str] = []
        for _, items in client.user_pages():
            ids.extend(item["id"] for item in items)
            if len(ids) >= users:
                break
        ids = ids[:users]
        before = client.stats.calls, client.stats.retries
        items = 0

        def count(_: str, pages: list[Any]) -> None:
            nonlocal items
            items += sum(len(page_items) for _, page_items in pages)

        paced = {"pace": client.pace} if "pace" in inspect.signature(run_concurrently).parameters else {}
        started, cpu_started = time.monotonic(), cpu_s()
        run_concurrently(ids, client.subscription_pages, workers=resource_.concurrency, on_result=count, **paced)
        return report(resource_, client, ids, items, before, time.monotonic() - started, cpu_s() - cpu_started)


if __name__ == "__main__":
    sys.exit(main())
