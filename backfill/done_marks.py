"""Done marks of the repos one backfill process finishes, committed together.

Marks that arrive while an earlier one is being committed wait and go in the next statement,
all of them (queries.REPO_DONE takes several repos; group_commit.py): under load several
repos share one round trip and one commit; alone, a mark goes at once.

Each repo's task still waits for its own mark to commit, so a finished task means a saved
repo, as the dispatcher's completion check expects, and its lease is renewed
(`Context.in_flight`) until then. A failed statement fails every mark it carried, as the
single mark failed before: the repos stay in progress until their leases expire, and are
written again (idempotent, invariant 2). The process's unsaved counters ride with the
statement (Progress.saving: given back if it fails).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from backfill import queue
from backfill.group_commit import GroupCommit
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
        self._group = GroupCommit(self._commit)

    async def mark(self, mark: queue.DoneMark) -> bool:
        """Mark the repo done, with whichever marks commit with it; False if its lease was
        lost."""
        return await self._group.submit(mark)

    async def _commit(self, marks: list[queue.DoneMark]) -> list[bool]:
        with self._progress.saving() as delta:
            async with self._conn() as conn:
                marked = await queue.mark_done_many(
                    conn, self._job_id, self._owner, marks, progress=delta
                )
        return [m.did in marked for m in marks]
