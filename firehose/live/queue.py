"""The bounded queue between the reader and the committer, and how a batch is taken off it.

Items are (read time, event). The queue is bounded (QUEUE_MAX_FRAMES): when the database is
slow, the reader's `put` waits, so the socket is read no faster than rows are committed
(design invariant 4). The reader ends it with `close()`; the committer takes whole batches
with `collect()`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

# The longest run of CPU work on the event loop between two yields, for the reader's decoding
# and the committer's preparing of the next batch. The batch transaction sends each of its
# statements (five to eight round trips per batch) only when the loop runs, and neither a
# buffered socket nor a non-full queue suspends the reader, so a long run of work stretches
# every round trip of it. A yield costs a loop iteration. bench/live.py (100,000 events, load
# average 0.44-0.58), for the reader: yielding every 16 frames (~1 ms) 6,446-6,866 events/s,
# every 4 (~0.25 ms) 7,634-8,312, every frame 6,499-6,885. For the committer: a new batch
# transaction's BEGIN used to wait until the next batch was prepared in one run (gate, rows,
# JSON: 9.5 ms of a 55 ms cycle per 1,000 events, traced); preparing in slices, 200,000
# events, seven pairs alternating (load average 0.41-0.44): faster in every pair, 139,932
# against 131,280 events/s summed (docs/performance-log.md, issue 11 session 12).
LOOP_SLICE_S = 0.00025
DONE = object()  # the item `close()` queues: the reader has stopped


class EventQueue:
    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        # The committer waiting for a batch: set by the reader once `_wanted` items (or its
        # end) are queued (see collect).
        self._filled = asyncio.Event()
        self._wanted = 0

    @property
    def maxsize(self) -> int:
        return self._queue.maxsize

    def qsize(self) -> int:
        return self._queue.qsize()

    async def put(self, item: Any) -> None:
        """Queue an item for the committer, waking it when its batch is full (collect)."""
        queue = self._queue
        await queue.put(item)
        if 0 < self._wanted <= queue.qsize() or item is DONE:
            self._filled.set()

    async def close(self) -> None:
        """The reader has stopped: the batch being collected closes at once."""
        await self.put(DONE)

    async def collect(self, max_events: int, max_wait_s: float) -> tuple[list[Any], bool]:
        """Queued items until `max_events` or `max_wait_s` passed since the first one.
        Returns them and whether the reader is done.

        While the queue is short of a batch, it waits for the reader to signal that enough
        items (or its end) are queued: one wake-up per batch, where waiting for each item
        cost a task and a timer per event."""
        queue = self._queue
        item = await queue.get()
        deadline = time.monotonic() + max_wait_s
        items: list[Any] = []
        while item is not DONE:
            items.append(item)
            if len(items) >= max_events:
                break
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._filled.clear()
                # A queue shorter than the batch (QUEUE_MAX_FRAMES < BATCH_MAX_EVENTS) signals
                # when full: the reader is blocked then, and the batch fills in turns.
                self._wanted = min(max_events - len(items), queue.maxsize)
                try:
                    async with asyncio.timeout(remaining):
                        await self._filled.wait()
                except TimeoutError:
                    pass
                finally:
                    self._wanted = 0
                if queue.empty():
                    break
            item = queue.get_nowait()
        return items, item is DONE
