"""Group commit without a timer: work that arrives while a statement runs goes in the next one.

A small repo costs a handful of statements (its share of a claim, its load, its done mark),
and on a small machine each statement's round trip, commit and wake-ups cost more than the
rows it carries. A `GroupCommit` sends what its callers submit together: an item submitted
while no statement runs goes at once, alone, as it would without the group; items submitted
while one runs wait, and all of them go in the next. Under load several repos share one
round trip and one commit; no item ever waits for a timer.

Each caller still awaits its own item's result, so a finished repo task means its work is
committed. A failed statement fails every item it carried, with its exception. The
statements run in a task of their own: a caller cancelled while it waits must not cancel the
statement the other items ride in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


class GroupCommit(Generic[_T, _R]):
    """Items for `commit`, which takes a list of them and returns one result per item, in
    order."""

    def __init__(self, commit: Callable[[list[_T]], Awaitable[list[_R]]]) -> None:
        self._commit = commit
        self._waiting: list[tuple[_T, asyncio.Future[_R]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def submit(self, item: _T) -> _R:
        """Commit `item` with whichever items commit with it; its result."""
        done: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_all())
        return await done

    async def _commit_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self._commit([item for item, _ in batch])
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:  # cancelled: the loop is closing
                    self._waiting = batch + self._waiting  # cancelled below, with the rest
                    raise
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)
        finally:
            self._committer = None
            # Cancelled with items still waiting (the loop is closing): do not strand them.
            for _, done in self._waiting:
                done.cancel()
            self._waiting = []
