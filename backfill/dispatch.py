"""The dispatch loop: repos claimed from the queue into throttled repo tasks.

`dispatch` claims while this process has free slots and no throttle holds (one repo at a
time under memory pressure), runs each claimed repo in a `RepoTask`, and, when the queue is
empty and none of its repos is in flight, asks its caller whether the job is complete. It
never runs more than `limit` repos at once, and a finished task's exception is logged, not
lost: the repo's lease expires and it is claimed again (backfill.queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from backfill import queue
from backfill.context import Context
from backfill.repo_task import RepoTask

__all__ = ["DISPATCH_IDLE_MIN_S", "DISPATCH_POLL_S", "dispatch", "wait_any"]

log = logging.getLogger("backfill")

# An empty queue is looked at again after DISPATCH_IDLE_MIN_S, then twice as long each time up
# to DISPATCH_POLL_S, and at once when this process queued repos (Context.queued). The
# repos of another process (a helper's last ones, a retry's delay) end the wait only by a
# poll: a flat 0.2 s poll left each of the two processes of bench/backfill.py idle for up
# to 0.2 s at the start (its first claim came before the enumeration's first page) and the
# job's completion up to 0.2 s after the other process's last repo, 2-3 % of a 10 s run.
DISPATCH_IDLE_MIN_S = 0.01
DISPATCH_POLL_S = 0.2


async def dispatch(
    ctx: Context, limit: int, try_complete: Callable[[Context], Awaitable[bool]]
) -> None:
    """Claim repos while there are free slots and no throttle holds; return when
    `try_complete` says the job is over (it is asked only with nothing of ours in flight),
    or when `ctx.halt` is set, after this process's repo tasks have ended."""
    slots = asyncio.Semaphore(limit)
    runner = RepoTask(ctx, slots)
    tasks: set[asyncio.Task[None]] = set()
    idle_s = DISPATCH_IDLE_MIN_S
    try:
        while not ctx.halt.is_set():
            tasks = _reap(tasks)
            await ctx.throttle.wait_claimable(ctx.halt, busy=_any_running(tasks))
            free = limit - len(tasks)
            if ctx.throttle.memory.closed:
                free = min(free, 1)  # under memory pressure: one repo at a time
            claimed: list[queue.Claimed] = []
            if free > 0 and not ctx.halt.is_set():
                ctx.queued.clear()  # what is queued from now on wakes the idle wait
                async with ctx.conn() as conn:
                    claimed = await queue.claim(conn, ctx.job.id, ctx.owner, free, ctx.lease_s)
            for c in claimed:
                tasks.add(asyncio.create_task(runner.run(c)))
            if claimed:
                idle_s = DISPATCH_IDLE_MIN_S
                continue
            if not tasks and await try_complete(ctx):
                return
            # Until a repo of ours ends, repos are queued here while a slot is free (a
            # full process would only wake again and again), a stop, or the poll.
            events = (ctx.halt, ctx.queued) if free > 0 else (ctx.halt,)
            await wait_any(tasks, events, idle_s if not tasks else DISPATCH_POLL_S)
            if not tasks:
                idle_s = min(idle_s * 2, DISPATCH_POLL_S)
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        ctx.halt.set()


async def wait_any(
    tasks: set[asyncio.Task[None]], events: tuple[asyncio.Event, ...], wait_s: float | None
) -> None:
    """Until one of `tasks` ends, one of `events` is set, or `wait_s` passes (None: no limit)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait({*tasks, *waiters}, timeout=wait_s, return_when="FIRST_COMPLETED")
    finally:
        for w in waiters:
            w.cancel()


def _any_running(tasks: set[asyncio.Task[None]]) -> Callable[[], bool]:
    return lambda: any(not t.done() for t in tasks)


def _reap(tasks: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
    """The repo tasks still running. A finished one's exception is retrieved and logged here
    (a database outage ends a repo task mid-write): asyncio would otherwise print "Task
    exception was never retrieved" with a traceback for each. Nothing is lost: the repo's
    lease expires and it is claimed again."""
    running: set[asyncio.Task[None]] = set()
    for t in tasks:
        if not t.done():
            running.add(t)
        elif not t.cancelled() and (exc := t.exception()) is not None:
            log.warning(
                "[BACKFILL] a repo task stopped (%s: %s); the repo is claimed again when its "
                "lease expires",
                type(exc).__name__,
                exc,
            )
    return running
