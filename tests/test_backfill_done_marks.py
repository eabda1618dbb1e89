"""Done marks committed together (backfill/done_marks.py) against a real PostgreSQL: marks
that arrive while one is committed share the next statement, each caller learns its own
outcome, a failed statement fails only the marks it carried and gives the counters back,
and a caller cancelled while it waits cancels nobody else's mark."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from backfill import jobs, queue
from backfill.done_marks import DoneMarks
from backfill.handles import pool_conn
from backfill.progress import Counts, Progress

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
OWNER = "h:w0:1"


async def claimed_job(conn: asyncpg.Connection, n: int) -> tuple[int, list[str]]:
    job = (await jobs.ensure_job(conn, 30, "wss://relay.example", NOW)).job
    await queue.enqueue(conn, job.id, [f"did:plc:{i:024d}" for i in range(n)], 0)
    claimed = await queue.claim(conn, job.id, OWNER, n, 600)
    return job.id, [c.did for c in claimed]


def marks_of(pool: asyncpg.Pool, job_id: int, progress: Progress) -> DoneMarks:
    return DoneMarks(lambda: pool_conn(pool), job_id, OWNER, progress)


@contextlib.asynccontextmanager
async def rows_held(pool: asyncpg.Pool, job_id: int) -> AsyncIterator[None]:
    """The job's queue rows locked by another transaction until the block ends."""
    async with pool.acquire() as holder:
        tr = holder.transaction()
        await tr.start()
        try:
            await holder.execute(
                "SELECT 1 FROM backfill_repos WHERE job_id = $1 FOR UPDATE", job_id
            )
            yield
        finally:
            await tr.rollback()


async def first_mark_waiting(conn: asyncpg.Connection) -> None:
    """Until a statement waits on a row lock (the first mark's, on `rows_held`)."""
    deadline = asyncio.get_running_loop().time() + 60
    while not await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
    ):
        assert asyncio.get_running_loop().time() < deadline, "the first mark never waited"
        await asyncio.sleep(0.005)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of marks each statement carried (the real statement runs)."""
    sizes: list[int] = []
    real = queue.mark_done_many

    async def spy(conn: Any, job_id: int, owner: str, marks: Any, **kw: Any) -> set[str]:
        sizes.append(len(marks))
        return await real(conn, job_id, owner, marks, **kw)

    monkeypatch.setattr(queue, "mark_done_many", spy)
    return sizes


async def test_marks_that_arrive_together_share_a_statement(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, dids = await claimed_job(conn, 20)
    sizes = counting(monkeypatch)
    progress = Progress()
    progress.add(Counts(received=30, processed=20, skipped=10, bytes=2000))
    marks = marks_of(pool, job_id, progress)
    # A lost lease: the repo was taken back and claimed by another process.
    await conn.execute("UPDATE backfill_repos SET lease_owner = 'other' WHERE did = $1", dids[5])
    results = await asyncio.gather(
        *(marks.mark(queue.DoneMark(d, f"rev{i}", i, 100)) for i, d in enumerate(dids))
    )
    assert results == [d != dids[5] for d in dids]
    # All arrived before the statement went (the committer is a task of its own).
    assert sizes == [20]
    rows = await conn.fetch(
        "SELECT did, state, rev, records FROM backfill_repos WHERE job_id = $1", job_id
    )
    done = {r["did"]: (r["rev"], r["records"]) for r in rows if r["state"] == "done"}
    assert done == {d: (f"rev{i}", i) for i, d in enumerate(dids) if d != dids[5]}
    job = await jobs.load_job(conn, job_id)
    assert job is not None and job.repos_done == 19
    row = await conn.fetchrow("SELECT * FROM backfill_jobs WHERE id = $1", job_id)
    assert (row["records_received"], row["records_processed"], row["bytes_downloaded"]) == (
        30,
        20,
        2000,
    )
    assert progress.unsaved.empty


async def test_a_failed_statement_fails_its_marks_and_gives_the_counters_back(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    job_id, dids = await claimed_job(conn, 3)
    progress = Progress()
    progress.add(Counts(received=7, processed=7))
    marks = marks_of(pool, job_id, progress)
    # records beyond bigint: PostgreSQL refuses the statement.
    with pytest.raises(asyncpg.DataError):
        await marks.mark(queue.DoneMark(dids[0], "r", 2**63, 0))
    assert (progress.unsaved.received, progress.unsaved.processed) == (7, 7)
    assert await queue.counts_by_state(conn, job_id) == {
        "pending": 0, "in_progress": 3, "done": 0, "failed": 0,
    }  # fmt: skip
    # The next marks go through, the counters with them.
    assert await marks.mark(queue.DoneMark(dids[0], "r", 1, 0))
    assert await marks.mark(queue.DoneMark(dids[1], "r", 1, 0))
    row = await conn.fetchrow("SELECT * FROM backfill_jobs WHERE id = $1", job_id)
    assert (row["repos_done"], row["records_received"]) == (2, 7)
    assert progress.unsaved.empty


async def test_a_caller_cancelled_while_it_waits_cancels_no_other_mark(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, dids = await claimed_job(conn, 3)
    sizes = counting(monkeypatch)
    marks = marks_of(pool, job_id, Progress())
    async with rows_held(pool, job_id):  # the first statement waits for them
        first = asyncio.create_task(marks.mark(queue.DoneMark(dids[0], "r", 0, 0)))
        await first_mark_waiting(conn)
        second = asyncio.create_task(marks.mark(queue.DoneMark(dids[1], "r", 0, 0)))
        third = asyncio.create_task(marks.mark(queue.DoneMark(dids[2], "r", 0, 0)))
        await asyncio.sleep(0.01)
        first.cancel()  # the repo task, not the statement: it still commits
        second.cancel()
    assert await third  # in the statement after the first
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await second
    states = await conn.fetch(
        "SELECT did, state FROM backfill_repos WHERE job_id = $1 ORDER BY did", job_id
    )
    # The first mark's statement was under way and committed; the second was still waiting
    # to be sent with the third, and went too (a cancelled caller only stops waiting).
    assert [r["state"] for r in states] == ["done", "done", "done"]
    assert sizes == [1, 2]  # the marks that arrived during a statement went in the next


async def test_a_committer_cancelled_mid_statement_strands_no_caller(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The loop closing cancels the committer: every caller still waiting is cancelled too,
    none waits for ever, and the next mark starts a new committer."""
    job_id, dids = await claimed_job(conn, 3)
    marks = marks_of(pool, job_id, Progress())
    async with rows_held(pool, job_id):
        first = asyncio.create_task(marks.mark(queue.DoneMark(dids[0], "r", 0, 0)))
        await first_mark_waiting(conn)
        second = asyncio.create_task(marks.mark(queue.DoneMark(dids[1], "r", 0, 0)))
        await asyncio.sleep(0.01)
        committer = marks._group._committer
        assert committer is not None
        committer.cancel()
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 60)
    assert await marks.mark(queue.DoneMark(dids[2], "r", 0, 0))
