"""backfill/group_commit.py: the first item goes at once, alone; items submitted while a
statement runs go together in the next; each caller gets its own item's result; a failed
statement fails exactly the items it carried. (With a real database: the done marks'
tests, tests/test_backfill_done_marks.py, and the backfill's small fresh repos.)"""

from __future__ import annotations

import asyncio

import pytest

from backfill.group_commit import GroupCommit


async def test_items_that_wait_go_together_and_each_gets_its_result() -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def commit(items: list[int]) -> list[int]:
        batches.append(items)
        await release.wait()
        if 13 in items:
            raise ValueError("refused")
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(commit)
    first = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert batches == [[1]]  # alone, at once
    waiting = [asyncio.create_task(group.submit(i)) for i in (2, 13, 4)]
    await asyncio.sleep(0.01)
    assert batches == [[1]]  # they wait for the statement under way
    release.set()
    assert await asyncio.wait_for(first, 60) == 10
    for task in waiting:
        with pytest.raises(ValueError, match="refused"):
            await asyncio.wait_for(task, 60)
    assert batches == [[1], [2, 13, 4]]
    # The group goes on after a failed statement.
    assert await asyncio.wait_for(asyncio.gather(group.submit(5), group.submit(6)), 60) == [50, 60]
    assert batches[2:] == [[5, 6]]
