"""How many vendor calls may be in flight: found by the client itself, no per-vendor tuning.

TCP-style AIMD on calls in flight, with a latency signal in the spirit of Netflix's
concurrency-limits (Gradient): no well-kept Python library does adaptive concurrency for
asyncio (the few on PyPI are a release or two old), so this is a small one of our own.

* **Slow start**: from a few calls in flight, one more per success (doubling every round trip)
  while calls succeed and latency holds, up to the ceiling.
* **429**: the vendor said no at today's limit, so its limit lies below. The new mark is what it let
  through in one round trip: of the calls started after the throttled one (they reached a vendor out of
  tokens), how many succeeded, scaled to the usual latency; or, when more, the calls in flight that the
  last unpaused second's successes needed (Little's law: rate times latency), since arrivals come in
  waves; and never more than one call under where the 429 came.
  Probing above a mark that a 429 set is twice as slow, and each 429 at the same place as the last one
  (the vendor's limit has not moved) halves its speed again, down to ``2 ** MAX_REPEATS`` times: every
  429 costs every call a pause, so the pace settles just under the vendor's limit instead of probing
  past it again and again.
  ``Retry-After`` pauses *every* call (no new call starts until it has passed), not just the
  call that got it, and once per window: the 429s of calls sent before the pause began say nothing new
  (a token bucket answers every call of a burst so), so they do not push it further. After the pause
  the calls start again from ``initial`` in flight, regrowing fast to the mark: all of them at once
  would spend more than a token bucket's small burst, and earn another pause at once.
* **Drops** (5xx, timeouts, resets) lower the limit as a 429 does, without a pause: an overloaded vendor
  says so by failing calls, as Netflix's concurrency-limits reads a drop.
* **Rising latency** (the smoothed latency above ``tolerance`` times the lowest seen, and by
  more than ``min_rise_s``, 50 ms): shrink by 10 %, and do not grow while it stays high. It sets no
  mark: once latency is back the limit regrows as before, since a spike (the network's, or a busy
  machine's) says less about the vendor than a 429. A rise under 50 ms is a fast vendor's queueing or
  this machine's scheduling, not congestion: backing off for it only costs CPU per call.
* **Queueing**: latency above ``tolerance`` times the lowest and by more than ``hold_rise_s`` (10 ms), but
  less than the 50 ms that shrink the limit: hold it. More calls in flight only wait in a queue then (a
  vendor answering in a millisecond, served as fast as this machine can go), and each one held in flight
  costs CPU in both processes: at zero latency 256 in flight cost ~20 % more per call than 8 to 64.
* At most one decrease per round trip: answers to calls sent before the last decrease say
  nothing about the new limit, so they cannot shrink it again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import takewhile

MAX_REPEATS = 4  # probing above the mark at most 16 times slower
Ticket = tuple[int, int, int]  # (epoch, pause window, call number): see AdaptiveLimit


@dataclass(frozen=True)
class PaceSnapshot:
    """What the run log and the asset metadata show."""

    limit: int
    in_flight: int
    peak: int
    throttled: int
    decreases: int
    dropped: int = 0


class AdaptiveLimit:
    """A semaphore whose size follows the vendor: ``acquire`` before a call, ``release`` after it.

    It lives on one event loop (its coroutines are the client's calls), so it needs no lock. A ticket
    says when its call started: the limit's epoch (bumped by each decrease), the pause window and the
    call's number (calls are numbered as they start).
    """

    def __init__(self, ceiling: int, *, initial: int = 4, tolerance: float = 2.0, min_rise_s: float = 0.05,
                 hold_rise_s: float = 0.01, probe_rounds: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        self.ceiling = ceiling
        self.tolerance = tolerance
        self.min_rise_s = min_rise_s
        self.hold_rise_s = hold_rise_s
        self.probe_rounds = probe_rounds
        self._clock = clock
        self._initial = float(min(initial, ceiling))
        self._limit = self._initial
        self._threshold = float(ceiling)  # below it: slow start; above it: slow probing
        self._in_flight = 0
        self._peak = int(self._limit)
        self._throttled = 0
        self._dropped = 0
        self._decreases = 0
        self._window = 0  # bumped by each pause a 429 starts
        self._epoch = 0  # bumped by each decrease
        self._smoothed: float | None = None
        self._lowest: float | None = None
        self._paused_until = 0.0
        self._resumed_at = clock()  # when calls last started after a pause (or the first call)
        self._successes: deque[tuple[float, int]] = deque(maxlen=16384)  # (when, call number) of recent successes
        self._bad: float | None = None  # the limit at the last 429 or drop
        self._repeats = 0  # 429s in a row at the same place
        self._started = 0  # calls started: each ticket's number
        self._cohort = (-1, 0)  # the epoch and number of the call whose 429 set the last mark
        self._cohort_successes = 0  # how many calls of that epoch started after it succeeded
        self._cohort_scale = 1.0  # the usual latency over that call's
        self._waiters: deque[asyncio.Future[None]] = deque()  # coroutines waiting for a slot

    @property
    def limit(self) -> int:
        return int(self._limit)

    def snapshot(self) -> PaceSnapshot:
        return PaceSnapshot(int(self._limit), self._in_flight, self._peak, self._throttled, self._decreases,
                            self._dropped)

    def pause_remaining(self) -> float:
        """Seconds until calls may start again after a 429's Retry-After (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def try_acquire(self) -> Ticket | None:
        """A ticket for ``release`` when a call may start now (a free slot, no pause), else None."""
        if self._in_flight < int(self._limit) and self._paused_until <= self._clock():
            self._in_flight += 1
            self._started += 1
            return self._epoch, self._window, self._started
        return None

    async def acquire(self) -> Ticket:
        """Wait on the event loop for a free slot and for any shared pause to end; returns a ticket."""
        loop = asyncio.get_running_loop()
        while (ticket := self.try_acquire()) is None:
            pause = self._paused_until - self._clock()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            # Woken by a release, or when the pause it saw should be over.
            timer = loop.call_later(pause, _wake, waiter) if pause > 0 else None
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
        return ticket

    def release(self, ticket: Ticket, *, latency_s: float | None = None, throttled: bool = False,
                retry_after_s: float = 0.0, dropped: bool = False) -> None:
        """Report how the call went: its latency when it succeeded, that the vendor said 429 (and how long
        that took), or that it dropped the call (5xx, timeout, reset)."""
        epoch, window, number = ticket
        busy = self._in_flight >= self._limit / 2  # an idle client learns nothing about the vendor
        self._in_flight -= 1
        if throttled or dropped:
            self._throttled += throttled
            self._dropped += dropped
            pause = throttled and window == self._window  # the first 429 of this window pauses everyone, once
            if epoch == self._epoch:  # calls sent before the last decrease say nothing about today's limit
                if throttled:
                    self._throttled_here(epoch, number, latency_s)
                else:
                    self._dropped_here()
            if pause:
                self._window += 1
                self._paused_until = max(self._paused_until, self._clock() + retry_after_s)
                self._resumed_at = self._paused_until
        elif latency_s is not None:
            self._successes.append((self._clock(), number))
            if epoch == self._cohort[0] and number > self._cohort[1]:
                self._cohort_success()
            self._observe(epoch, latency_s, busy)
        free = max(1, int(self._limit) - self._in_flight)
        while free and self._waiters:
            if _wake(self._waiters.popleft()):
                free -= 1

    def _observe(self, ticket: int, latency_s: float, busy: bool) -> None:
        smoothed = latency_s if self._smoothed is None else self._smoothed + 0.1 * (latency_s - self._smoothed)
        self._smoothed = smoothed
        # The lowest latency seen drifts up slowly, so a vendor that became slower for good is not
        # taken for a congested one forever.
        lowest = smoothed if self._lowest is None else self._lowest
        self._lowest = min(smoothed, lowest + 0.0001 * (smoothed - lowest))
        if ticket != self._epoch:
            return
        rise = smoothed - self._lowest if smoothed > self.tolerance * self._lowest else 0.0
        if rise > self.min_rise_s:
            # No new mark: a latency spike (the network's, or a busy machine's) is no limit to remember the way
            # a 429 is; once latency is back, the limit regrows as fast as it grew before.
            self._decrease(0.9)
            # The latency a smaller limit brings is the new normal only once it is seen again.
            self._smoothed = None
        elif busy and rise <= self.hold_rise_s:  # calls that only queue are not worth more in flight
            if self._limit < self._threshold:
                self._limit = min(self._threshold, self._limit + 1.0)
            else:
                rounds = self.probe_rounds * 2 ** self._repeats
                self._limit = min(float(self.ceiling), self._limit + 1.0 / (self._limit * rounds))
            self._peak = max(self._peak, int(self._limit))

    def _throttled_here(self, epoch: int, number: int, latency_s: float | None) -> None:
        """The vendor said 429 at today's limit: every call waits out the pause, then starts again small.

        The mark is how many of the calls started after the throttled one succeed (``_cohort_success``):
        they reached the vendor once it had no tokens left and were sent over one round trip faster than
        it allows, so they get what it lets through in one round trip: its limit in calls in flight. The
        round trip is the throttled call's own, so the count is scaled to the usual latency."""
        at = math.floor(self._limit)
        self._repeats = min(self._repeats + 1, MAX_REPEATS) if self._bad is not None and at <= self._bad + 1 else 1
        self._bad = at
        # Arrivals come in waves, so a round trip's share can fall short: the last second's pace is a floor.
        self._threshold = max(1.0, min(at - 1.0, float(math.floor(self._sustained() + 0.5))))
        self._cohort = (epoch, number)
        self._cohort_successes = 0
        usual = self._smoothed
        self._cohort_scale = min(2.0, max(0.5, usual / latency_s)) if usual and latency_s else 1.0
        # Some started after it have succeeded already (answers vary in latency): they count too.
        for _, later in takewhile(lambda success: success[1] > number - 2 * self.ceiling, reversed(self._successes)):
            if later > number:
                self._cohort_success()
        self._limit = max(1.0, min(self._initial, math.floor(at / 2)))
        self._epoch += 1
        self._decreases += 1

    def _cohort_success(self) -> None:
        assert self._bad is not None
        self._cohort_successes += 1
        estimate = math.floor(self._cohort_successes * self._cohort_scale + 0.5)
        self._threshold = max(self._threshold, min(self._bad - 1.0, float(estimate)))

    def _dropped_here(self) -> None:
        """A 5xx, timeout or reset at today's limit: halve it, and set the mark at 90 % of where the drop
        came, but not below 90 % of the calls in flight that the last second's successes needed."""
        at = self._limit
        self._threshold = max(1.0, min(0.9 * at, max(0.5 * at, 0.9 * self._sustained())))
        self._decrease(0.5)

    def _sustained(self) -> float:
        """Calls in flight that the successes of the last unpaused second took at the smoothed latency
        (0 when under a quarter of a second has passed since the last pause: too few to tell)."""
        now = self._clock()
        since = max(now - 1.0, self._resumed_at)
        if self._smoothed is None or now - since < 0.25:
            return 0.0
        done = sum(1 for _ in takewhile(lambda success: success[0] >= since, reversed(self._successes)))
        return done / (now - since) * self._smoothed

    def _decrease(self, factor: float) -> None:
        self._limit = max(1.0, math.floor(self._limit * factor))
        self._epoch += 1
        self._decreases += 1


def _wake(waiter: asyncio.Future[None]) -> bool:
    if waiter.done():  # already woken, or its call was cancelled
        return False
    waiter.set_result(None)
    return True
