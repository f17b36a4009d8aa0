"""How many vendor calls may be in flight: found by the client itself, no per-vendor tuning.

TCP-style AIMD on calls in flight, with a latency signal in the spirit of Netflix's
concurrency-limits (Gradient): no well-kept Python library does adaptive concurrency for
asyncio (the few on PyPI are a release or two old), so this is a small one of our own.

* **Slow start**: from a few calls in flight, one more per success (doubling every round trip)
  while calls succeed and latency holds, up to the ceiling.
* **429**: halve. If it came after probing a whole call above the last mark, the vendor's limit lies
  just below: the new mark is 90 % of where it came; otherwise the mark was too high, and halves too,
  but not below 90 % of the calls in flight that the last second's successes needed (Little's law:
  rate times latency), so a throttled client does not collapse far below the vendor's rate.
  Regrow quickly to the mark, then probe above it slowly (one more per ``probe_rounds`` round
  trips), since every 429 costs every worker a pause.
  ``Retry-After`` pauses *every* call (no new call starts until it has passed), not just the
  call that got it, and once per window: the 429s of calls sent before the pause began say nothing new
  (a token bucket answers every call of a burst so), so they do not push it further.
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
    says when its call started: the limit's epoch (bumped by each decrease) and the pause window.
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
        self._limit = float(min(initial, ceiling))
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
        self._second = 0  # successes per whole second of the clock, for _sustained
        self._successes = 0
        self._last_second_successes = 0
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

    def try_acquire(self) -> tuple[int, int] | None:
        """A ticket for ``release`` when a call may start now (a free slot, no pause), else None."""
        if self._in_flight < int(self._limit) and self._paused_until <= self._clock():
            self._in_flight += 1
            return self._epoch, self._window
        return None

    async def acquire(self) -> tuple[int, int]:
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

    def release(self, ticket: tuple[int, int], *, latency_s: float | None = None, throttled: bool = False,
                retry_after_s: float = 0.0, dropped: bool = False) -> None:
        """Report how the call went: its latency when it succeeded, that the vendor said 429, or that it
        dropped the call (5xx, timeout, reset)."""
        epoch, window = ticket
        busy = self._in_flight >= self._limit / 2  # an idle client learns nothing about the vendor
        self._in_flight -= 1
        if throttled or dropped:
            self._throttled += throttled
            self._dropped += dropped
            if throttled and window == self._window:  # the first 429 of this window pauses everyone, once
                self._window += 1
                self._paused_until = max(self._paused_until, self._clock() + retry_after_s)
            if epoch == self._epoch:
                # Probed past the mark: the vendor's limit is just below here. Still regrowing
                # towards it: the mark was too high as well. Never below what the calls that
                # succeeded in the last second need at today's latency (Little's law).
                factor = 0.9 if self._limit >= self._threshold + 1 else 0.5
                self._threshold = max(1.0, min(0.9 * self._limit,
                                               max(factor * self._limit, 0.9 * self._sustained())))
                self._decrease(0.5)
        elif latency_s is not None:
            self._count_success()
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
                self._limit = min(float(self.ceiling), self._limit + 1.0 / (self._limit * self.probe_rounds))
            self._peak = max(self._peak, int(self._limit))

    def _count_success(self) -> None:
        second = int(self._clock())
        if second != self._second:
            self._last_second_successes = self._successes if second == self._second + 1 else 0
            self._second, self._successes = second, 0
        self._successes += 1

    def _sustained(self) -> float:
        """Calls in flight that the last whole second's successes took at the smoothed latency."""
        if self._smoothed is None or int(self._clock()) != self._second:
            return 0.0
        return self._last_second_successes * self._smoothed

    def _decrease(self, factor: float) -> None:
        self._limit = max(1.0, math.floor(self._limit * factor))
        self._epoch += 1
        self._decreases += 1


def _wake(waiter: asyncio.Future[None]) -> bool:
    if waiter.done():  # already woken, or its call was cancelled
        return False
    waiter.set_result(None)
    return True
