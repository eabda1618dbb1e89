"""Throttles that keep the backfill from hurting the live stream.

Decisions are pure (numbers in, a verdict out) so they are tested without I/O; `Throttle`
gathers the inputs (measured RSS, live pressure, the job's pause flags) and `wait_clear`
parks callers until no reason holds.

* memory: RSS measured with psutil (design invariant 4). Above 90 % of BACKFILL_MAX_MEMORY_MB
  the backfill stops claiming repos and narrows writing to one repo at a time; it resumes
  only below 80 %, so it does not flap around one threshold (hysteresis). Writing is
  narrowed, not stopped: an in-flight repo holds its snapshot and batch in memory until it
  is written, so stopping every writer would hold RSS up for ever (a stall seen in the
  e2e memory test). For the same reason a process with nothing in flight may still claim
  one repo, and on entering the pressure state freed memory is handed back to the OS
  (gc + malloc_trim) so RSS can actually fall.
* idle (BACKFILL_USE_IDLE): the backfill yields while the live pipeline is behind, i.e. its
  queue is at least half full or its lag exceeds 30 s.
* rate_limit: every known host is paused by a 429.
* paused: `firehose backfill pause` set the job's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

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


# The throttle asks for RSS before every batch and every claim: with small repos hundreds of
# times a second, and each read opens /proc (py-spy: 4.2 % of a small-repo backfill
# process's samples, `--repos 6000 --records 10`). A reading at most this old is used
# instead: RSS moves little in 50 ms, and the gate's hysteresis spans 10 % of the limit.
RSS_REFRESH_S = 0.05
_rss_read: dict[int, tuple[float, int]] = {}  # pid -> (monotonic time, RSS)


def process_rss_bytes() -> int:
    """This process's resident memory, read at most every RSS_REFRESH_S. The psutil handle
    is kept (per pid, a forked child gets its own), since building one reads /proc as well:
    68 µs a call against 27 (timeit, load average 0.28)."""
    pid, now = os.getpid(), time.monotonic()
    at, rss = _rss_read.get(pid, (-RSS_REFRESH_S, 0))
    if now - at >= RSS_REFRESH_S:
        rss = int(_this_process(pid).memory_info().rss)
        _rss_read[pid] = (now, rss)
    return rss


@functools.cache
def _this_process(pid: int) -> Any:
    import psutil

    return psutil.Process(pid)


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
        self._memory_writer = asyncio.Lock()  # one writing repo at a time under pressure

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
        if state["memory"] and not self._last["memory"]:
            release_memory()
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
            await _poll(stop)

    async def wait_claimable(self, stop: asyncio.Event, busy: Callable[[], bool]) -> None:
        """Claiming waits for every reason, except that under memory pressure alone a
        process with nothing in flight (`busy()` false) may claim (one repo; the caller
        limits it), so a baseline RSS above the low mark never stalls the backfill."""
        while not stop.is_set():
            state = self.state()
            others = any(holds for name, holds in state.items() if name != "memory")
            if not others and (not state["memory"] or not busy()):
                return
            await _poll(stop)

    @contextlib.asynccontextmanager
    async def write_turn(self, stop: asyncio.Event) -> AsyncIterator[None]:
        """Hold a write until no reason but memory holds; under memory pressure, writers
        take turns one at a time (see the module docstring)."""
        while not stop.is_set():
            state = self.state()
            if not any(holds for name, holds in state.items() if name != "memory"):
                break
            await _poll(stop)
        if self.memory.closed:
            async with self._memory_writer:
                yield
        else:
            yield


async def _poll(stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), THROTTLE_POLL_S)


def release_memory() -> None:
    """Collect cycles and ask glibc to return free heap pages to the OS, so that RSS, which
    the memory throttle reads, can fall once in-flight repos are written."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name).malloc_trim(0)
