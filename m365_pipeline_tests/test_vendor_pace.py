"""The real clients find the vendor's pace: the simulator with latency and rate limits over real HTTP.

No timing assertions (speed belongs in ``make bench``): these prove that calls in flight rise when
nothing holds them back, fall under a rate limit, that 429s pause and are retried, and that
every row lands either way.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import aclosing
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import requests
from dagster import DagsterInstance, materialize

from m365_pipeline.assets.raw import raw_assets
from m365_pipeline.processes import GC_YOUNG_THRESHOLD, young_garbage_collected_less
from m365_pipeline.resources import SaasApiResource
from m365_pipeline.resources.http import (
    AHEAD,
    Page,
    VendorError,
    VendorNotFoundError,
    _query,
    path_segment,
    run_concurrently,
    run_pull,
)
from m365_pipeline.simulator import Simulator

from .helpers import FAST_HTTP, make_resources
from .test_raw_assets import _assert_landed_exactly

INITIAL_LIMIT = 4  # AdaptiveLimit's default start


def pull_subscriptions(sim: Simulator, **resource: Any) -> tuple[dict[str, list[Page]], dict[str, Any]]:
    """Every user's subscriptions via SaasClient on run_concurrently, as raw.saas_user_subscriptions does."""
    saas = SaasApiResource(base_url=sim.saas_base_url, token=sim.config.saas_token, **{**FAST_HTTP, **resource})
    got: dict[str, list[Page]] = {}

    async def pull() -> dict[str, Any]:
        async with saas.client() as client:
            ids = await user_ids(client)
            await run_concurrently(ids, client.subscription_pages, workers=saas.concurrency,
                                   on_result=got.__setitem__, pace=client.pace)
            return client.stats.as_metadata()

    return got, run_pull(pull())


async def user_ids(client: Any) -> list[str]:
    return [item["id"] async for _, items in client.user_pages() for item in items]


def assert_every_subscription_landed(sim: Simulator, got: dict[str, list[Page]]) -> None:
    expected = {u["id"]: sorted(s["id"] for s in sim.dataset.saas_subscriptions(u["id"]))
                for u in sim.dataset.saas_users()}
    landed = {user: sorted(item["id"] for _, items in pages for item in items) for user, pages in got.items()}
    assert landed == expected


def test_calls_in_flight_rise_while_a_slow_vendor_keeps_answering(start_simulator):
    sim = start_simulator(orgs=20, users_per_org=20, latency_ms=30, jitter_ms=10)
    got, meta = pull_subscriptions(sim)
    assert_every_subscription_landed(sim, got)
    assert meta["vendor_429s"] == 0
    # Slow start doubles per round trip: far past where it started.
    assert meta["concurrency_peak"] >= 8 * INITIAL_LIMIT, meta


def test_calls_in_flight_fall_under_a_rate_limit_and_every_row_still_lands(start_simulator):
    sim = start_simulator(orgs=10, users_per_org=16, latency_ms=30, jitter_ms=10, rate_limit=60, rate_burst=10)
    got, meta = pull_subscriptions(sim)
    assert_every_subscription_landed(sim, got)
    assert meta["vendor_429s"] > 0 and sim.stats()["faults"]["rate_limit"] == meta["vendor_429s"]
    assert meta["concurrency_final"] < meta["concurrency_peak"], meta
    assert meta["vendor_retries"] >= meta["vendor_429s"]


def test_the_user_list_asks_for_its_later_pages_together_and_keeps_the_vendors_order(start_simulator):
    sim = start_simulator(orgs=10, users_per_org=20, latency_ms=30, jitter_ms=25)  # ~20 pages of 10, out of order
    saas = SaasApiResource(base_url=sim.saas_base_url, token=sim.config.saas_token, page_size=10, **FAST_HTTP)
    async def pull() -> list[str]:
        async with saas.client() as client:
            return await user_ids(client)

    listed = run_pull(pull())
    assert listed == [user["id"] for user in sim.dataset.saas_users()]
    assert sim.stats()["requests"]["saas_users"] == -(-len(listed) // 10) > 10  # each page once
    # One page at a time reuses one kept-alive connection; pages asked for together need one each.
    assert sim.stats()["connections"]["accepted"] > 1


def test_a_user_list_left_after_its_first_page_cancels_the_pages_asked_for_ahead(start_simulator):
    sim = start_simulator(orgs=10, users_per_org=20, latency_ms=200)  # ~20 pages of 10, each 200 ms away
    saas = SaasApiResource(base_url=sim.saas_base_url, token=sim.config.saas_token, page_size=10, **FAST_HTTP)
    async def pull() -> None:
        async with saas.client() as client:
            async with aclosing(client.user_pages()) as pages:
                await anext(pages)
                await anext(pages)  # page 2: pages 3.. were asked for ahead meanwhile
            assert asyncio.all_tasks() == {asyncio.current_task()}  # nothing left running on the loop

    run_pull(pull())
    assert sim.stats()["requests"]["saas_users"] < 15  # not the whole list


def test_the_ceiling_bounds_calls_in_flight(start_simulator):
    sim = start_simulator(orgs=10, users_per_org=20, latency_ms=20)
    got, meta = pull_subscriptions(sim, concurrency=3)
    assert_every_subscription_landed(sim, got)
    assert meta["concurrency_peak"] == 3


@pytest.mark.slow
def test_both_sources_and_every_paged_list_land_exactly_under_a_rate_limit(start_simulator, db_path):
    # Tiny pages: the per-owner tenant and mailbox lists take many pages each, all throttled alike.
    sim = start_simulator(latency_ms=10, rate_limit=40, rate_burst=10)
    instance = DagsterInstance.ephemeral()
    result = materialize(raw_assets, instance=instance,
                         resources=make_resources(sim, db_path, saas={"page_size": 9}, backup={"per_page": 4}))
    assert result.success
    _assert_landed_exactly(sim, db_path)
    throttled = {node: result.asset_materializations_for_node(node)[0].metadata["vendor_429s"].value
                 for node in ("raw__saas_users", "raw__saas_user_subscriptions", "raw__backup_tenants",
                              "raw__backup_accounts")}
    assert sum(throttled.values()) == sim.stats()["faults"]["rate_limit"] > 0, throttled
    assert throttled["raw__saas_user_subscriptions"] > 0 and throttled["raw__backup_accounts"] > 0, throttled
    # The run log says, as the pull goes, how fast it is, how many calls are in flight and how many 429s.
    progress = [entry.user_message for entry in instance.all_logs(result.run_id)
                if entry.user_message.startswith("tenants' mailboxes:")]
    assert progress and all("calls/s" in line and "concurrency" in line and "answered 429" in line
                            for line in progress), progress


@pytest.mark.parametrize("value", ["9f1c-4b2e_x.Y~", "a/b", "../x", "ü ?#&%", 42, ""])
def test_a_vendor_value_is_one_path_segment_encoded_as_urllib_would(value):
    assert path_segment(value) == quote(str(value), safe="")


@pytest.mark.parametrize("params", [{"page_size": 1000, "page_number": 3}, {"type": "m365", "page": 1},
                                    {"email": "a+b@x.com ü&=?", "page": True}])
def test_query_strings_are_what_urlencode_makes(params):
    assert _query(params) == urlencode(params)


def test_results_come_back_in_input_order_while_calls_finish_out_of_order(start_simulator):
    sim = start_simulator(orgs=6, users_per_org=10, latency_ms=20, jitter_ms=15)
    saas = SaasApiResource(base_url=sim.saas_base_url, token=sim.config.saas_token, **FAST_HTTP)
    order: list[str] = []

    async def pull() -> list[str]:
        async with saas.client() as client:
            ids = await user_ids(client)
            await run_concurrently(ids, client.subscription_pages, workers=saas.concurrency,
                                   on_result=lambda user, _: order.append(user), pace=client.pace)
            return ids

    ids = run_pull(pull())
    assert order == ids and len(ids) == len(set(ids)) > 40


def test_the_first_failure_stops_the_pull_and_is_raised(start_simulator):
    sim = start_simulator(orgs=12, users_per_org=10, latency_ms=5)
    saas = SaasApiResource(base_url=sim.saas_base_url, token=sim.config.saas_token, **FAST_HTTP)
    async def pull() -> list[str]:
        async with saas.client() as client:
            ids = await user_ids(client)
            ids[3] = "no-such-user"  # the vendor answers 404
            with pytest.raises(VendorNotFoundError, match=r"no-such-user/subscriptions \(page 1\) answered HTTP 404"):
                await run_concurrently(ids, client.subscription_pages, workers=4, on_result=lambda *_: None,
                                       pace=client.pace)
            return ids

    ids = run_pull(pull())
    # Everything not yet started was dropped: far fewer calls than users (the window is AHEAD x 4).
    assert sim.stats()["requests"]["saas_subscriptions"] <= AHEAD * 4 + 4 < len(ids) // 2


@pytest.mark.parametrize("fails", [False, True])
def test_the_garbage_collector_skips_what_was_alive_before_a_pull_and_is_restored_after(fails):
    before, seen = gc.get_threshold(), []

    async def fn(item: int) -> int:
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
        if fails and item == 2:
            raise ValueError("boom")
        return item

    try:
        run_pull(run_concurrently(range(3), fn, workers=2, on_result=lambda *_: None))
    except ValueError:
        assert fails
    assert seen and all(threshold == GC_YOUNG_THRESHOLD and frozen > 1000 for threshold, frozen in seen)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_overlapping_pulls_keep_the_collector_settings_until_the_last_one_ends():
    before = gc.get_threshold()
    inner_started, outer_may_end = threading.Event(), threading.Event()
    seen: list[int] = []

    def other_pull() -> None:  # a second pull in another thread of the same process
        with young_garbage_collected_less():
            inner_started.set()
            outer_may_end.wait(10)
            seen.append(gc.get_threshold()[0])  # after the first pull ended: still its settings

    with young_garbage_collected_less():
        with young_garbage_collected_less():  # nested: leaving it restores nothing yet
            pass
        seen.append(gc.get_threshold()[0])
        thread = threading.Thread(target=other_pull)
        thread.start()
        assert inner_started.wait(10)
    outer_may_end.set()
    thread.join(10)
    assert seen == [GC_YOUNG_THRESHOLD, GC_YOUNG_THRESHOLD]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


class _Redirect(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def redirecting_to() -> Iterator[Callable[[str], str]]:
    """A loopback vendor address that answers every GET with a redirect to another host's."""
    servers: list[HTTPServer] = []

    def start(target: str) -> str:
        handler = type("Redirect", (_Redirect,), {"target": target})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_redirect_is_not_followed_so_the_token_never_reaches_another_host(start_simulator, redirecting_to):
    sim = start_simulator()
    front = redirecting_to(sim.base_url)
    saas = SaasApiResource(base_url=front + "/api/saas/consolidated-view/v1", token=sim.config.saas_token,
                           **FAST_HTTP)
    async def pull() -> None:
        async with saas.client() as client:
            await user_ids(client)

    with pytest.raises(VendorError, match="HTTP 302, a redirect") as failure:
        run_pull(pull())
    assert sim.stats()["requests_total"] == 0  # the host it pointed to never saw our token
    assert sim.config.saas_token not in str(failure.value)


# -- the simulator's side ---------------------------------------------------------------------------

def test_simulator_rate_limit_answers_429_with_retry_after_per_token(start_simulator):
    sim = start_simulator(rate_limit=1, rate_burst=3)
    saas: Callable[[], requests.Response] = lambda: requests.get(  # noqa: E731
        sim.saas_base_url + "/users", headers={"Authorization": f"Bearer {sim.config.saas_token}"}, timeout=10)
    statuses = [saas() for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["Retry-After"]) >= 1
    # Source B's reseller token has a bucket of its own.
    backup = requests.get(sim.backup_base_url + "/users", timeout=10, headers={
        "X-Reseller-Token": sim.config.reseller_token, "X-Access-Token": sim.config.admin_token})
    assert backup.status_code == 200
