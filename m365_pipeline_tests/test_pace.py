"""The client's pace (resources/pace.py) and the simulator's rate limit (simulator/faults.py), as plain logic.

A fake clock drives both, so nothing here waits or measures time.
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from m365_pipeline.resources.http import CallStats
from m365_pipeline.resources.pace import AdaptiveLimit, Ticket
from m365_pipeline.simulator.faults import Counters, FaultConfig, FaultInjector, TokenBuckets


def take(limit: AdaptiveLimit) -> Ticket:
    ticket = limit.try_acquire()
    assert ticket is not None, "no slot free"
    return ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def busy_round(limit: AdaptiveLimit, latency_s: float) -> None:
    """One round trip of a busy client: as many calls as the limit allows complete with ``latency_s``,
    each replaced at once by a new call (so the client stays at its limit), then the rest drain."""
    tickets = deque(take(limit) for _ in range(limit.limit))
    for _ in range(len(tickets)):
        limit.release(tickets.popleft(), latency_s=latency_s)
        while len(tickets) < limit.limit:
            tickets.append(take(limit))
    for ticket in tickets:
        limit.release(ticket)  # no sample: these calls belong to the next round


def test_slow_start_doubles_the_limit_every_round_while_latency_holds():
    limit = AdaptiveLimit(ceiling=1000, initial=4, clock=Clock())
    seen = []
    for _ in range(5):
        busy_round(limit, 0.100)
        seen.append(limit.limit)
    assert seen == [8, 16, 32, 64, 128]


@pytest.mark.parametrize("ceiling", [1, 5, 64])
def test_the_limit_never_passes_the_ceiling(ceiling):
    limit = AdaptiveLimit(ceiling=ceiling, initial=4, clock=Clock())
    for _ in range(12):
        busy_round(limit, 0.100)
    assert limit.limit == ceiling == limit.snapshot().peak


def test_an_idle_client_does_not_grow_its_limit():
    limit = AdaptiveLimit(ceiling=1000, initial=8, clock=Clock())
    for _ in range(50):  # one call at a time: far below the limit, so success says nothing
        limit.release(take(limit), latency_s=0.1)
    assert limit.limit == 8


def test_a_429_halves_the_limit_once_per_round_and_pauses_every_caller():
    clock = Clock()
    limit = AdaptiveLimit(ceiling=1000, initial=32, clock=clock)
    tickets = [take(limit) for _ in range(32)]
    for ticket in tickets[:10]:  # ten calls of the same round answered 429: one decrease, not ten
        limit.release(ticket, throttled=True, retry_after_s=3)
    snap = limit.snapshot()
    assert (snap.limit, snap.throttled, snap.decreases) == (16, 10, 1)
    assert limit.pause_remaining() == 3
    clock.now += 3
    assert limit.pause_remaining() == 0


def test_a_429_at_the_first_try_with_nothing_through_regrows_no_further_than_half():
    limit = AdaptiveLimit(ceiling=1000, initial=40, clock=Clock())
    limit.release(take(limit), throttled=True, retry_after_s=0)
    for _ in range(3):
        busy_round(limit, 0.1)
    assert limit.limit == 20  # no regrowth past where it started again: nothing says more is safe, yet


def test_a_429s_retry_after_holds_back_every_coroutine_too_until_it_has_passed():
    clock = Clock()
    limit = AdaptiveLimit(ceiling=10, initial=4, clock=clock)
    other = take(limit)
    limit.release(take(limit), throttled=True, retry_after_s=30)

    async def scenario() -> None:
        waiting = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0.3)
        assert not waiting.done(), "a call started during the pause"  # slots are free; only the pause holds it
        clock.now += 30
        limit.release(other, latency_s=0.1)  # any release wakes the waiters, who see the pause is over
        await asyncio.wait_for(waiting, 10)

    asyncio.run(scenario())


def test_coroutines_beyond_the_limit_wait_for_a_release():
    limit = AdaptiveLimit(ceiling=2, initial=2, clock=Clock())

    async def scenario() -> None:
        held = [await limit.acquire(), await limit.acquire()]
        third = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0.1)
        assert not third.done() and limit.snapshot().in_flight == 2
        limit.release(held[0], latency_s=0.1)
        await asyncio.wait_for(third, 10)
        assert limit.snapshot().in_flight == 2

    asyncio.run(scenario())


def throttle_round(limit: AdaptiveLimit, clock: Clock, through: int) -> None:
    """A round trip at the limit whose first call is answered 429 (a vendor out of tokens): of the calls
    started after it, ``through`` succeed and the rest are answered 429 too; then the pause passes."""
    tickets = [take(limit) for _ in range(limit.limit)]
    limit.release(tickets[0], throttled=True, retry_after_s=1, latency_s=0.1)
    for ticket in tickets[1:through + 1]:
        limit.release(ticket, latency_s=0.1)
    for ticket in tickets[through + 1:]:
        limit.release(ticket, throttled=True, retry_after_s=1, latency_s=0.1)
    clock.now += 1


def probe_rounds_to_grow_by_one(limit: AdaptiveLimit) -> int:
    start, rounds = limit.limit, 0
    while limit.limit == start:
        busy_round(limit, 0.1)
        rounds += 1
    return rounds


def test_a_429_sets_the_mark_at_what_the_vendor_let_through_in_one_round_trip_then_probes_ever_slower():
    clock = Clock()
    limit = AdaptiveLimit(ceiling=1000, initial=30, probe_rounds=50, clock=clock)
    throttle_round(limit, clock, through=19)  # 30 in flight, the vendor lets 19 through a round trip
    assert limit.limit == 15  # the pause is over: start again small
    busy_round(limit, 0.1)
    assert limit.limit == 19  # regrown in a round trip to the mark, no further
    first = probe_rounds_to_grow_by_one(limit)
    assert 95 <= first <= 105  # above a mark a 429 set: twice probe_rounds
    throttle_round(limit, clock, through=19)  # the same place again: the vendor's limit has not moved
    busy_round(limit, 0.1)
    assert limit.limit == 19
    assert 190 <= probe_rounds_to_grow_by_one(limit) <= 210  # slower again


def test_a_429_never_sets_the_mark_below_the_last_seconds_pace_nor_above_one_call_under_it():
    # A round trip in a lull of arrivals: the throttled call's successors are few, the second's pace is not.
    clock = Clock()
    limit = AdaptiveLimit(ceiling=21, initial=21, clock=clock)
    for _ in range(40):  # two seconds at 21 in flight, a round every 50 ms: more a second than 21 needed
        busy_round(limit, 0.1)
        clock.now += 0.05
    throttle_round(limit, clock, through=3)
    busy_round(limit, 0.1)
    assert limit.limit == 20  # the last second needed 21 in flight, but the 429 came at 21

    other = Clock()
    generous = AdaptiveLimit(ceiling=1000, initial=10, clock=other)
    throttle_round(generous, other, through=9)  # every later call went through: still under the 429's place
    busy_round(generous, 0.1)
    assert generous.limit == 9


def test_rising_latency_shrinks_the_limit_and_steady_latency_does_not():
    limit = AdaptiveLimit(ceiling=1000, initial=64, clock=Clock())
    busy_round(limit, 0.100)
    busy_round(limit, 0.120)
    before = limit.limit
    assert limit.snapshot().decreases == 0 and before > 64
    for _ in range(3):
        busy_round(limit, 0.400)
    assert limit.snapshot().decreases == 3  # one per round trip, not one per slow answer
    assert limit.limit < 0.75 * before


def test_a_latency_spike_that_passes_leaves_no_mark_and_the_limit_regrows_fast():
    limit = AdaptiveLimit(ceiling=1000, initial=32, clock=Clock())
    busy_round(limit, 0.100)
    before = limit.limit
    busy_round(limit, 0.400)  # a busy machine stalls every call of one round trip
    assert limit.snapshot().decreases == 1 and limit.limit < before
    for _ in range(2):
        busy_round(limit, 0.100)
    assert limit.limit > 1.5 * before  # slow start goes on (a mark there would hold it near before)


def test_latency_noise_below_the_absolute_floor_is_not_congestion():
    # 0.2 ms -> 1 ms is five times slower but only 0.8 ms more: scheduler noise on a busy machine.
    limit = AdaptiveLimit(ceiling=1000, initial=8, clock=Clock())
    busy_round(limit, 0.0002)
    for _ in range(3):
        busy_round(limit, 0.001)
    assert limit.snapshot().decreases == 0


def test_calls_that_only_queue_hold_the_limit_without_shrinking_it():
    # A vendor answering in 1 ms: at 32 in flight answers take 20 ms, so the calls only wait in a queue.
    limit = AdaptiveLimit(ceiling=1000, initial=32, clock=Clock())
    busy_round(limit, 0.001)
    before = limit.limit
    busy_round(limit, 0.020)  # the smoothed latency takes a few answers to see the queue
    held = limit.limit
    assert held < before + 10
    for _ in range(5):
        busy_round(limit, 0.020)
    assert limit.limit == held and limit.snapshot().decreases == 0
    for _ in range(3):  # the queue drained: latency is back, and so is growth
        busy_round(limit, 0.001)
    assert limit.limit > held


def test_the_429s_of_calls_sent_before_a_pause_do_not_extend_it_but_a_later_window_pauses_again():
    # A token bucket answers every call of a burst past its tokens 429, and their answers trickle in.
    clock = Clock()
    limit = AdaptiveLimit(ceiling=100, initial=40, clock=clock)
    burst = [take(limit) for _ in range(40)]
    limit.release(burst[0], throttled=True, retry_after_s=1)
    for ticket in burst[1:20]:
        clock.now += 0.02  # answers of the same burst, arriving after the pause began
        limit.release(ticket, throttled=True, retry_after_s=1)
    assert limit.pause_remaining() == pytest.approx(1 - 19 * 0.02)  # paused once, from the first 429
    for ticket in burst[20:]:
        limit.release(ticket, latency_s=0.1)
    clock.now += 1
    assert limit.pause_remaining() == 0
    later = take(limit)  # sent after the pause: its 429 is news, and starts the next window
    limit.release(later, throttled=True, retry_after_s=1)
    assert limit.pause_remaining() == 1
    assert limit.snapshot().throttled == 21


@pytest.mark.parametrize("how", [{"dropped": True}, {"throttled": True, "retry_after_s": 2}])
def test_a_dropped_call_lowers_the_limit_as_a_429_does_but_pauses_no_one(how):
    limit = AdaptiveLimit(ceiling=1000, initial=32, clock=Clock())
    tickets = [take(limit) for _ in range(32)]
    for ticket in tickets[:5]:  # five 5xx, timeouts or resets of one round: one decrease
        limit.release(ticket, **how)
    snap = limit.snapshot()
    assert (snap.limit, snap.decreases) == (16, 1)
    assert (snap.dropped, snap.throttled) == ((5, 0) if "dropped" in how else (0, 5))
    assert limit.pause_remaining() == (0 if "dropped" in how else 2)
    for ticket in tickets[5:]:
        limit.release(ticket)


def test_a_decrease_never_goes_below_one_call_in_flight():
    limit = AdaptiveLimit(ceiling=10, initial=2, clock=Clock())
    for _ in range(5):
        limit.release(take(limit), throttled=True, retry_after_s=0)
    assert limit.limit == 1


# -- the simulator's token bucket -------------------------------------------------------------------

def test_token_bucket_allows_a_burst_then_answers_the_seconds_until_a_token():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(4)] == [None, None, None, 1]
    assert buckets.take("b") is None  # each token has its own bucket
    clock.now += 0.5  # one token back at 2/s
    assert buckets.take("a") is None and buckets.take("a") == 1


def test_token_bucket_retry_after_is_whole_seconds_at_a_slow_rate():
    buckets = TokenBuckets(rate=0.25, burst=1, clock=Clock())
    assert [buckets.take("a"), buckets.take("a")] == [None, 4]


@pytest.mark.parametrize("bad", [{"jitter_ms": 5}, {"latency_ms": 5, "jitter_ms": 6}, {"rate_limit": -1},
                                 {"rate_burst": -1}])
def test_fault_config_rejects_impossible_latency_and_limits(bad):
    with pytest.raises(ValueError):
        FaultConfig(**bad)


def test_latency_jitter_varies_each_delay_within_its_bounds():
    injector = FaultInjector(FaultConfig(latency_ms=40, jitter_ms=30), seed=1, counters=Counters())
    delays = [injector.plan("saas", "/users").delay_s for _ in range(200)]
    assert 0.010 <= min(delays) and max(delays) <= 0.070
    assert max(delays) - min(delays) > 0.030  # it does vary


def test_the_progress_line_shows_calls_per_second_calls_in_flight_and_429s():
    limit = AdaptiveLimit(ceiling=100, initial=6, clock=Clock())
    limit.release(take(limit), throttled=True, retry_after_s=0)
    stats = CallStats(pace=limit)
    stats.record(retries=1)
    line = stats.progress()
    assert "2 calls, 1 retries" in line and "calls/s" in line
    assert "concurrency 3 (peak 6), 1 answered 429" in line
    assert stats.as_metadata()["vendor_429s"] == 1 and stats.as_metadata()["concurrency_final"] == 3
