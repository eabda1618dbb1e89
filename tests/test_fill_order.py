"""A fresh repo's rows go in two ascending passes (firehose/storage/fill_order.py), and on a
real PostgreSQL that leaves the `uri` keys' index pages nearly full where key order left
them half empty."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, RecordWrite
from firehose.storage import fill_order, snapshots
from firehose.storage.fill_order import page_filling_order
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
