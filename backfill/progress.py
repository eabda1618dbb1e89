"""Progress counters, the guide's log lines, and when to save.

Received = records read from repos; processed = records written; skipped = outside the
window, filtered or invalid. Counters are kept per process and added to the job row every
SAVE_EVERY_RECORDS records (the guide: "Progress is saved to the database every 1000
events"), when a repo finishes, and when the service stops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("backfill")

SAVE_EVERY_RECORDS = 1000
LOG_EVERY_S = 15.0  # the progress line at most this often (and at the end)
MIB = 1024 * 1024


@dataclass(slots=True)
class Counts:
    received: int = 0
    processed: int = 0
    skipped: int = 0
    bytes: int = 0

    def add(self, other: Counts) -> None:
        self.received += other.received
        self.processed += other.processed
        self.skipped += other.skipped
        self.bytes += other.bytes

    def minus(self, other: Counts) -> Counts:
        """What these counts gained since `other` (an earlier copy of them)."""
        return Counts(
            self.received - other.received,
            self.processed - other.processed,
            self.skipped - other.skipped,
            self.bytes - other.bytes,
        )

    @property
    def empty(self) -> bool:
        return not (self.received or self.processed or self.skipped or self.bytes)


def progress_line(received: int, processed: int, skipped: int, rate: float) -> str:
    return (
        f"[BACKFILL] Progress: {received} received, {processed} processed, "
        f"{skipped} skipped ({rate:.0f} evt/s)"
    )


def memory_line(rss_bytes: int, limit_mb: int) -> str:
    return f"[BACKFILL] Memory: {rss_bytes // MIB}MB / {limit_mb}MB limit"


def start_line(days: int, worker_id: int) -> str:
    where = "primary worker" if worker_id == 0 else f"worker {worker_id}"
    if days == -1:
        return f"[BACKFILL] Starting full-history backfill on {where}..."
    return f"[BACKFILL] Starting {days}-day historical backfill on {where}..."


def config_lines(
    batch_size: int, batch_delay_ms: int, max_concurrent: int, max_memory_mb: int, use_idle: bool
) -> list[str]:
    return [
        "[BACKFILL] Resource throttling config:",
        f"  - Batch size: {batch_size} events",
        f"  - Batch delay: {batch_delay_ms}ms",
        f"  - Max concurrent: {max_concurrent}",
        f"  - Memory limit: {max_memory_mb}MB",
        f"  - Idle processing: {use_idle}",
    ]


class Progress:
    """This process's totals, the part not yet saved, and the rate since the last line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = Counts()
        self.unsaved = Counts()
        self._clock = clock
        self._last_log_at = clock()
        self._last_log_received = 0

    def add(self, delta: Counts) -> None:
        self.total.add(delta)
        self.unsaved.add(delta)

    def add_helpers(self, delta: Counts) -> None:
        """Counts of this backfill's helper processes: in the totals and the progress line,
        not in `unsaved` (each helper saves its own to the job row)."""
        self.total.add(delta)

    def save_due(self) -> bool:
        return self.unsaved.received >= SAVE_EVERY_RECORDS

    @contextlib.contextmanager
    def saving(self) -> Iterator[Counts]:
        """The unsaved counts, taken for a save; given back if the save fails, for the next."""
        taken, self.unsaved = self.unsaved, Counts()
        try:
            yield taken
        except BaseException:
            self.unsaved.add(taken)
            raise

    def log_due(self) -> bool:
        return self._clock() - self._last_log_at >= LOG_EVERY_S

    def log(self, rss_bytes: int, limit_mb: int) -> None:
        now = self._clock()
        elapsed = max(now - self._last_log_at, 1e-9)
        rate = (self.total.received - self._last_log_received) / elapsed
        self._last_log_at = now
        self._last_log_received = self.total.received
        t = self.total
        log.info(progress_line(t.received, t.processed, t.skipped, rate))
        log.info(memory_line(rss_bytes, limit_mb))
