"""bench/pgwaits.py, the benchmarks' `--waits`: what PostgreSQL's backends run and wait on."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pgwaits import ACTIVITY, PgWaits
from bench.sqltiming import statement_words

INSERT = "INSERT INTO actors (did) VALUES ('did:plc:pgwaits') ON CONFLICT DO NOTHING"
KEY_WORDS = "INSERT INTO actors (did) VALUES"
DEADLINE_S = 60.0  # only reached when something is broken: every wait below is for a state


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_statement_words_fold_whitespace() -> None:
    assert statement_words("\n  WITH u AS (\n UPDATE actors   SET x = 1") == "WITH u AS ( UPDATE"
    assert statement_words("") == ""


def test_idle_backends_are_one_key_and_samples_average() -> None:
    waits = PgWaits("postgresql://unused")
    idle = {"state": "idle", "wait_event_type": "Client", "wait_event": "ClientRead", "query": "x"}
    running = {"state": "active", "wait_event_type": None, "wait_event": None, "query": INSERT}
    waits.add([idle, idle, running])
    waits.add([idle])
    assert waits.averages() == [
        (("idle", "", ""), 1.5),
        (("active", "-", KEY_WORDS), 0.5),
    ]


async def test_a_lock_wait_and_an_open_transaction_are_seen(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    holder = await asyncpg.connect(db_dsn)
    waiter = await asyncpg.connect(db_dsn)
    blocked: asyncio.Task[str] | None = None
    try:
        # The holder inserts a row and leaves its transaction open; the waiter's insert of
        # the same key waits for the holder's transaction to end.
        tx = holder.transaction()
        await tx.start()
        await holder.execute(INSERT)
        blocked = asyncio.create_task(waiter.execute(INSERT))
        waiter_pid = waiter.get_server_pid()

        async def waiter_is_blocked() -> bool:
            event = await conn.fetchval(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", waiter_pid
            )
            return bool(event == "transactionid")

        await _until(waiter_is_blocked, "the waiter to block on the holder")

        waits = PgWaits(db_dsn, sample_s=0.005).start()

        async def ten_samples() -> bool:
            return waits.samples >= 10

        try:
            await _until(ten_samples, "ten samples")
        finally:
            waits.stop()
        await tx.commit()
        await blocked
    finally:
        if blocked is not None and not blocked.done():
            blocked.cancel()
        await holder.close()
        await waiter.close()

    averages = dict(waits.averages())
    # Both states held through every sample: one backend each, on average.
    assert averages[("idle in transaction", "Client:ClientRead", KEY_WORDS)] == 1.0
    assert averages[("active", "Lock:transactionid", KEY_WORDS)] == 1.0
    # The sampler leaves its own backend out.
    assert not any(statement == statement_words(ACTIVITY) for _, _, statement in averages)
