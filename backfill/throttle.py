"""Throttles that keep the backfill from hurting the live stream.

Decisions are pure (numbers in, a verdict out) so they are tested without I/O; `Throttle`
gathers the inputs (measured RSS, live pressure, the job's pause flags) and `wait_clear`
parks callers until no reason holds.

* memory: RSS measured with psutil (design invariant 4). Above 90 % of BACKFILL_MAX_MEMORY_MB
  the backfill stops claiming repos and pauses writing; it resumes only below 80 %, so it
  does not flap around one threshold (hysteresis).
* idle (BACKFILL_USE_IDLE): the backfill yields while the live pipeline is behind, i.e. its
  queue is at least half full or its lag exceeds 30 s.
* rate_limit: every known host is paused by a 429.
* paused: `firehose backfill pause` set the job's status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

MIB = 1024 * 1024
MEMORY_HIGH_RATIO = 0.90  # pause above 90 % of the limit ...
MEMORY_LOW_RATIO = 0.80  # ... resume below 80 %
IDLE_QUEUE_RATIO = 0.5  # live queue half full: the database is the bottleneck
IDLE_MAX_LAG_S = 30.0  # live lag above this: the live stream is catching up
THROTTLE_POLL_S = 0.1  # how often a parked caller re-checks

REASONS = ("memory", "idle", "rate_limit", "paused")


@dataclass(frozen=True, slots=True)
class LivePressure:
    """The live pipeline's state, as the worker sees it."""

    lag_s: float
    queue_depth: int
    queue_max: int


def live_behind(p: LivePressure) -> bool:
    if p.queue_max > 0 and p.queue_depth >= p.queue_max * IDLE_QUEUE_RATIO:
        return True
    return p.lag_s > IDLE_MAX_LAG_S


class MemoryGate:
    """Hysteresis on RSS: closed above `high`, open again only below `low`."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.high = int(limit_bytes * MEMORY_HIGH_RATIO)
        self.low = int(limit_bytes * MEMORY_LOW_RATIO)
        self.closed = False

    def update(self, rss_bytes: int) -> bool:
        """True while the backfill must hold back."""
        if self.closed:
            if rss_bytes < self.low:
                self.closed = False
        elif rss_bytes > self.high:
            self.closed = True
        return self.closed


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Throttle:
    def __init__(
        self,
        *,
        max_memory_mb: int,
        use_idle: bool,
        rss_reader: Callable[[], int] = process_rss_bytes,
        live_pressure: Callable[[], LivePressure] | None = None,
    ) -> None:
        self.memory = MemoryGate(max_memory_mb * MIB)
        self.use_idle = use_idle
        self._rss_reader = rss_reader
        self._live_pressure = live_pressure
        self.rss_bytes = 0
        # Set from the job row by the service's control loop.
        self.paused = False
        self.rate_limited = False
        self.on_change: Callable[[dict[str, bool]], None] | None = None
        self._last: dict[str, bool] = dict.fromkeys(REASONS, False)

    def state(self) -> dict[str, bool]:
        """Each reason -> whether it holds now (reads RSS and live pressure)."""
        self.rss_bytes = self._rss_reader()
        idle = False
        if self.use_idle and self._live_pressure is not None:
            idle = live_behind(self._live_pressure())
        state = {
            "memory": self.memory.update(self.rss_bytes),
            "idle": idle,
            "rate_limit": self.rate_limited,
            "paused": self.paused,
        }
        if state != self._last:
            self._last = state
            if self.on_change is not None:
                self.on_change(state)
        return state

    def reason(self) -> str | None:
        """The first reason that holds, or None when the backfill may go on."""
        for name, holds in self.state().items():
            if holds:
                return name
        return None

    async def wait_clear(self, stop: asyncio.Event) -> None:
        """Return once no reason holds, or when `stop` is set."""
        while not stop.is_set() and self.reason() is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), THROTTLE_POLL_S)
