"""What the parts of one running backfill share: the job, the database, the throttles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from backfill.jobs import Job
from backfill.metrics import BackfillMetrics
from backfill.network import Network
from backfill.progress import Progress
from backfill.settings import BackfillSettings
from backfill.throttle import Throttle

T = TypeVar("T")

LEASE_S = 60.0  # a repo lease; renewed every LEASE_S / 3 while the repo is in flight


class Halted(Exception):
    """The backfill is stopping; the caller releases its work."""


@dataclass
class Context:
    settings: BackfillSettings
    pool: asyncpg.Pool
    network: Network
    metrics: BackfillMetrics
    throttle: Throttle
    progress: Progress
    job: Job
    owner: str
    halt: asyncio.Event  # set on stop, or when the job finished
    db_slots: asyncio.Semaphore  # leaves the live path at least one pooled connection
    lease_s: float = LEASE_S
    wanted_collections: tuple[str, ...] = ()
    in_flight: set[str] = field(default_factory=set)
    # Set when this process queued repos (an enumeration page): the dispatcher, idle on an
    # empty queue, claims at once instead of at its next poll.
    queued: asyncio.Event = field(default_factory=asyncio.Event)
    dead_owners: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def conn(self) -> AsyncIterator[Any]:
        async with self.db_slots, self.pool.acquire() as conn:
            yield conn

    async def until_halt(self, aw: Awaitable[T]) -> T:
        """Await `aw`, cancelling it and raising Halted if the backfill stops first."""
        task = asyncio.ensure_future(aw)
        halt = asyncio.ensure_future(self.halt.wait())
        try:
            await asyncio.wait({task, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Halted
        return task.result()

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early (Halted) if the backfill stops."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.halt.wait(), seconds)
        if self.halt.is_set():
            raise Halted
