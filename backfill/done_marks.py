"""Done marks of the repos one backfill process finishes, committed together.

A small repo costs a handful of round trips: its share of a claim, its load (one statement
when fresh) and its done mark. Marks that arrive while an earlier one is being committed
wait and go in the next statement, all of them (queries.REPO_DONE takes several repos):
under load several repos share one round trip and one commit; alone, a mark goes at once,
as before (a group commit, no timer).

Each repo's task still waits for its own mark to commit, so a finished task means a saved
repo, as the dispatcher's completion check expects, and its lease is renewed
(`Context.in_flight`) until then. A failed statement fails every mark it carried, as the
single mark failed before: the repos stay in progress until their leases expire, and are
written again (idempotent, invariant 2). The process's unsaved counters ride with the
statement (Progress.saving: given back if it fails).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from backfill import queue
from backfill.progress import Progress


class DoneMarks:
    """The done marks of one process's repos of job `job_id`, leased by `owner`; `conn`
    gives a pooled connection (Context.conn), `progress` the process's counters."""

    def __init__(
        self,
        conn: Callable[[], AbstractAsyncContextManager[Any]],
        job_id: int,
        owner: str,
        progress: Progress,
    ) -> None:
        self._conn = conn
        self._job_id = job_id
        self._owner = owner
        self._progress = progress
        self._waiting: list[tuple[queue.DoneMark, asyncio.Future[bool]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def mark(self, mark: queue.DoneMark) -> bool:
        """Mark the repo done, with whichever marks commit with it; False if its lease was
        lost."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((mark, done))
        if self._committer is None:
            # Its own task: a repo task cancelled while it waits must not cancel the
            # statement the other marks ride in.
            self._committer = asyncio.create_task(self._commit_all())
        return await done

    async def _commit_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    marked = await self._commit([m for m, _ in batch])
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:  # cancelled: the loop is closing
                    self._waiting = batch + self._waiting  # cancelled below, with the rest
                    raise
                for m, done in batch:
                    if not done.done():
                        done.set_result(m.did in marked)
        finally:
            self._committer = None
            # Cancelled with marks still waiting (the loop is closing): do not strand them.
            for _, done in self._waiting:
                done.cancel()
            self._waiting = []

    async def _commit(self, marks: list[queue.DoneMark]) -> set[str]:
        with self._progress.saving() as delta:
            async with self._conn() as conn:
                return await queue.mark_done_many(
                    conn, self._job_id, self._owner, marks, progress=delta
                )
