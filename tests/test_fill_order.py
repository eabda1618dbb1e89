"""A fresh repo's rows go in two ascending passes (firehose/storage/fill_order.py), and on a
real PostgreSQL that leaves the `uri` keys' index pages nearly full where key order left
them half empty: in one load, and across the small batches of a throttled backfill."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from backfill_support import run_backfill_service
from hypothesis import given
from hypothesis import strategies as st

from backfill import repo_task
from backfill.settings import PROFILES, BackfillSettings
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, RecordWrite
from firehose.storage import fill_order, snapshots
from firehose.storage.fill_order import (
    FILL_CHUNK_ROWS,
    chunks_in_filling_order,
    page_filling_order,
)
from firehose.storage.snapshots import write_snapshot


@given(st.lists(st.integers(), unique=True).map(sorted))
def test_the_order_is_two_ascending_passes_over_every_row(keys: list[int]) -> None:
    out = page_filling_order(keys)
    assert sorted(out) == keys  # every row, once
    first = sum(1 for i in range(len(keys)) if i % 9 < 5)
    assert out[:first] == sorted(out[:first]) and out[first:] == sorted(out[first:])
    # The first pass is spread over the whole range: 5 of every 9 keys in key order.
    chosen = set(out[:first])
    for start in range(0, len(keys) - 8, 9):
        assert sum(k in chosen for k in keys[start : start + 9]) == 5


def test_the_order_keeps_any_rows() -> None:
    rows = [("at://b", 2), ("at://a", 1)]  # rows, not keys: the order given is kept per pass
    assert page_filling_order(rows) == rows
    assert page_filling_order([]) == []


@given(st.integers(0, 3 * FILL_CHUNK_ROWS), st.integers(1, FILL_CHUNK_ROWS + 10))
def test_a_repos_batches_are_ordered_chunk_by_chunk(n: int, batch_rows: int) -> None:
    keys = list(range(n))
    out = list(chunks_in_filling_order(iter(keys), batch_rows))
    assert sorted(out) == keys
    for start in range(0, n, FILL_CHUNK_ROWS):
        chunk = keys[start : start + FILL_CHUNK_ROWS]
        got = out[start : start + FILL_CHUNK_ROWS]  # chunks never mix
        # A chunk that fits in one batch is left to that batch (snapshots.write_rows).
        assert got == (page_filling_order(chunk) if len(chunk) > batch_rows else chunk)


RECORDS = 2000


def likes(did: str) -> list[RecordWrite]:
    rev = tid(2**40)
    return [like(did, rev, i) for i in range(RECORDS)]


def like(did: str, rev: str, i: int) -> RecordWrite:
    record = {
        "$type": "app.bsky.feed.like",
        "subject": {"uri": f"at://did:plc:s/app.bsky.feed.post/{i}", "cid": "bafys"},
        "createdAt": "2024-01-01T00:00:00Z",
    }
    rkey = tid(2**39 + i)
    return RecordWrite(did, "app.bsky.feed.like", rkey, rev, Action.CREATE, f"bafy{i}", record)


async def pages(conn: asyncpg.Connection, index: str) -> int:
    return int(await conn.fetchval("SELECT pg_relation_size($1::regclass) / 8192", index))


async def load_fresh_repo(conn: asyncpg.Connection, run: int) -> tuple[int, int]:
    """A fresh repo of RECORDS likes, loaded in one batch (by COPY), into key ranges that are
    not the indexes' rightmost (PostgreSQL fills a rightmost page to 90 % in any order): the
    pages of records_pkey and likes_pkey after it. (New dids each run: the process remembers
    the loads it made, snapshots.fresh_loads.)"""
    await conn.execute("TRUNCATE records, likes, actors")
    did = f"did:plc:fillorder{run}"
    # A repo whose uris sort after every one of did's.
    assert (await write_snapshot(conn, likes(f"did:plc:zzzz{run}")[:200])).fresh == 200
    before = await pages(conn, "records_pkey"), await pages(conn, "likes_pkey")
    stats = await write_snapshot(conn, likes(did))
    assert stats.fresh == RECORDS and stats.typed == RECORDS
    n = await conn.fetchval("SELECT count(*) FROM likes WHERE did = $1", did)
    assert n == RECORDS
    return (
        await pages(conn, "records_pkey") - before[0],
        await pages(conn, "likes_pkey") - before[1],
    )


async def test_a_fresh_repo_leaves_its_index_pages_nearly_full(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    filled = await load_fresh_repo(conn, 1)
    keyed = snapshots.page_filling_order  # what the load uses
    assert keyed is fill_order.page_filling_order

    def in_key_order(rows: Any) -> list[Any]:
        return list(rows)

    monkeypatch.setattr(snapshots, "page_filling_order", in_key_order)
    in_order = await load_fresh_repo(conn, 2)
    # ~68 bytes per key (a 56-byte uri, its tuple header, its line pointer): 2,000 keys fill
    # 17 pages. Measured: 38 pages in key order, 21 in two passes, for either index.
    for full, half in zip(filled, in_order, strict=True):
        assert half >= 30  # key order: half empty (else the test's ranges were rightmost)
        assert full <= 0.7 * half


BATCH_ROWS = 20  # a throttled profile's batch: a repo is many loads
SETTINGS = BackfillSettings(
    days=-1,
    profile="moderate",
    batch_size=BATCH_ROWS,
    batch_delay_ms=0,
    max_concurrent=3,
    max_memory_mb=PROFILES["unthrottled"].max_memory_mb,
    use_idle=False,
    allow_private_network=True,
)


async def backfilled_pages(relay: DevnetRelay, dsn: str) -> tuple[int, int]:
    """Backfill the devnet's repos into `dsn`, after a row whose key sorts after all of theirs
    (PostgreSQL fills a rightmost page to 90 % in any order): records_pkey's pages, keys."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO records (uri, did, collection, rkey, cid, rev, record)"
            " VALUES ('at://did:plc:zzzz/a.b.c/x', 'did:plc:zzzz', 'a.b.c', 'x', 'bafy', 'r', '{}')"
        )
        await run_backfill_service(relay, dsn, SETTINGS, timeout_s=180)
        assert await conn.fetchval("SELECT status FROM backfill_jobs") == "completed"
        keys = await conn.fetchval("SELECT count(*) FROM records")
        return await pages(conn, "records_pkey"), keys
    finally:
        await conn.close()


@pytest.mark.slow
async def test_a_throttled_backfill_fills_its_index_pages_across_batches(
    new_database: Callable[..., Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DevnetConfig(seed=11, accounts=2, events=0, repo_accounts=4, repo_records=1200)
    async with DevnetRelay(config) as relay:
        filled, keys = await backfilled_pages(relay, await new_database())
        # No chunks: each batch of 20 in key order after the last (each with the load's own
        # two passes inside it, which a batch this small cannot make up for).
        monkeypatch.setattr(repo_task, "FILL_CHUNK_ROWS", 0)
        in_order, same_keys = await backfilled_pages(relay, await new_database())
    assert keys == same_keys > 4 * 1200
    # Measured: 93 pages in key order, 66 in chunks of two passes, for 4,805 keys (about 50
    # full pages): the chunks' edges and the batches that straddle a pass keep some room.
    assert in_order >= 1.3 * filled, (filled, in_order, keys)
