"""apply_batch(): rev guards, tombstones, accounts, cursor atomicity (invariants 1 and 2)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import AccountEvent, Action, Batch, IdentityEvent, RecordWrite
from firehose.storage import queries
from firehose.storage.prepare import (
    PREPARE_STEP_WRITES,
    ApplyStats,
    applied_writes,
    heads_from_writes,
    prepare_batch,
    prepare_steps,
    records_json,
)
from firehose.storage.snapshots import write_snapshot
from firehose.storage.writer import apply_batch, apply_prepared, load_cursor, save_cursor

ALICE = "did:plc:alice"
BOB = "did:plc:bob"
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"


def post(did: str, rkey: str, rev: int, text: str = "hi", **extra: Any) -> RecordWrite:
    record = {"$type": POST, "text": text, "createdAt": "2024-05-01T12:00:00Z", **extra}
    return RecordWrite(did, POST, rkey, tid(rev), Action.CREATE, f"bafy{text}{rev}", record)


def like(did: str, rkey: str, rev: int, subject: str = "at://did:plc:x/p/1") -> RecordWrite:
    record = {
        "$type": LIKE,
        "subject": {"uri": subject, "cid": "bafysubj"},
        "createdAt": "2024-05-01T12:00:00.123+02:00",
    }
    return RecordWrite(did, LIKE, rkey, tid(rev), Action.CREATE, f"bafylike{rev}", record)


def delete(did: str, collection: str, rkey: str, rev: int) -> RecordWrite:
    return RecordWrite(did, collection, rkey, tid(rev), Action.DELETE)


async def rows(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, str]]:
    assert table in queries.REPO_TABLES
    result = await conn.fetch(f"SELECT uri, cid, rev FROM {table}")
    return {r["uri"]: (r["cid"], r["rev"]) for r in result}


async def test_create_update_delete(conn: asyncpg.Connection) -> None:
    p1 = post(ALICE, "a", 1, "one")
    stats = await apply_batch(conn, Batch(writes=[p1, like(ALICE, "l", 1)], cursor=10))
    assert (stats.upserted, stats.typed, stats.skipped) == (2, 2, 0)
    row = await conn.fetchrow("SELECT * FROM records WHERE uri = $1", p1.uri)
    assert row["did"] == ALICE and row["collection"] == POST and row["rkey"] == "a"
    assert row["cid"] == "bafyone1" and row["rev"] == tid(1)
    assert row["created_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    import json

    assert json.loads(row["record"])["text"] == "one"
    like_row = await conn.fetchrow("SELECT * FROM likes")
    assert like_row["subject_uri"] == "at://did:plc:x/p/1"
    assert like_row["created_at"] == datetime(2024, 5, 1, 10, 0, 0, 123000, tzinfo=UTC)

    p2 = RecordWrite(ALICE, POST, "a", tid(2), Action.UPDATE, "bafytwo", {"text": "two"})
    await apply_batch(conn, Batch(writes=[p2], cursor=11))
    assert (await rows(conn, "records"))[p1.uri] == ("bafytwo", tid(2))
    assert await conn.fetchval("SELECT text FROM posts WHERE uri = $1", p1.uri) == "two"

    stats = await apply_batch(conn, Batch(writes=[delete(ALICE, POST, "a", 3)], cursor=12))
    assert (stats.deleted, stats.tombstones) == (1, 1)
    assert p1.uri not in await rows(conn, "records")
    assert p1.uri not in await rows(conn, "posts")
    assert await conn.fetchval("SELECT rev FROM record_tombstones WHERE uri = $1", p1.uri) == tid(3)
    assert await load_cursor(conn, "firehose") == 12


async def test_tombstone_blocks_older_create(conn: asyncpg.Connection) -> None:
    await apply_batch(conn, Batch(writes=[delete(ALICE, POST, "a", 5)]))
    # A backfill snapshot (older rev) must not resurrect it ...
    stats = await write_snapshot(conn, [post(ALICE, "a", 4)])
    assert stats.skipped == 1 and stats.upserted == 0
    assert await rows(conn, "records") == {}
    assert await rows(conn, "posts") == {}
    # ... nor a replay at the same rev as the delete; a newer re-create is fine.
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 5)]))
    assert await rows(conn, "records") == {}
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 6, "again")]))
    assert list((await rows(conn, "records")).values()) == [("bafyagain6", tid(6))]
    assert list((await rows(conn, "posts")).values()) == [("bafyagain6", tid(6))]


async def test_older_snapshot_never_overwrites_newer_live(conn: asyncpg.Connection) -> None:
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 9, "live")], cursor=1))
    stats = await write_snapshot(conn, [post(ALICE, "a", 7, "snap"), post(ALICE, "b", 7, "snap")])
    assert stats.upserted == 1 and stats.skipped == 1
    got = await rows(conn, "records")
    assert got[post(ALICE, "a", 9).uri] == ("bafylive9", tid(9))
    assert got[post(ALICE, "b", 7).uri] == ("bafysnap7", tid(7))
    assert await conn.fetchval("SELECT text FROM posts WHERE rkey = 'a'") == "live"
    # An older delete leaves the newer row alone (its tombstone is recorded).
    await apply_batch(conn, Batch(writes=[delete(ALICE, POST, "a", 8)]))
    assert post(ALICE, "a", 9).uri in await rows(conn, "posts")


async def test_replay_is_idempotent(conn: asyncpg.Connection) -> None:
    batch = Batch(writes=[post(ALICE, "a", 1), like(BOB, "l", 2)], cursor=5)
    await apply_batch(conn, batch)
    before = await conn.fetch("SELECT uri, xmin::text AS x FROM records ORDER BY uri")
    stats = await apply_batch(conn, batch)
    assert stats.upserted == 0 and stats.skipped == 2 and stats.typed == 0
    # Replays write nothing: same tuple versions.
    assert await conn.fetch("SELECT uri, xmin::text AS x FROM records ORDER BY uri") == before


async def test_applied_writes_keep_highest_rev_and_later_tie() -> None:
    a1, a3, a2 = post(ALICE, "a", 1, "x"), post(ALICE, "a", 3, "y"), post(ALICE, "a", 2, "z")
    tie = post(ALICE, "a", 3, "w")
    assert applied_writes([a1, a3, a2]) == {a1.uri: a3}
    assert applied_writes([a1, a3, tie, a2]) == {a1.uri: tie}
    assert heads_from_writes([a1, a3, like(BOB, "l", 2)]) == [
        (ALICE, tid(3), None),
        (BOB, tid(2), None),
    ]


async def test_in_batch_create_then_delete(conn: asyncpg.Connection) -> None:
    stats = await apply_batch(
        conn, Batch(writes=[post(ALICE, "a", 1), delete(ALICE, POST, "a", 2), post(ALICE, "b", 1)])
    )
    assert stats.duplicates == 1
    assert set(await rows(conn, "records")) == {post(ALICE, "b", 1).uri}
    assert await conn.fetchval("SELECT count(*) FROM record_tombstones") == 1


async def test_account_deleted_purges_and_blocks(conn: asyncpg.Connection) -> None:
    await apply_batch(
        conn,
        Batch(
            writes=[post(ALICE, "a", 1), like(ALICE, "l", 2), post(BOB, "b", 1)],
            identities=[IdentityEvent(1, ALICE, None, "alice.test")],
        ),
    )
    # An other repo whose did starts like Alice's must survive the prefix-range purge.
    alice2 = "did:plc:alice2"
    await apply_batch(conn, Batch(writes=[post(alice2, "z", 1)]))
    stats = await apply_batch(
        conn, Batch(accounts=[AccountEvent(5, ALICE, None, active=False, status="deleted")])
    )
    assert stats.purged == 2
    dids = {r["did"] for r in await conn.fetch("SELECT did FROM records")}
    assert dids == {BOB, alice2}
    assert await conn.fetchval("SELECT count(*) FROM likes") == 0
    assert await conn.fetchval("SELECT count(*) FROM posts WHERE did = $1", ALICE) == 0
    actor = await conn.fetchrow("SELECT * FROM actors WHERE did = $1", ALICE)
    assert (actor["status"], actor["active"], actor["handle"]) == ("deleted", False, "alice.test")
    # A later backfill snapshot of the deleted account (older rev) cannot bring rows back.
    stats = await write_snapshot(conn, [post(ALICE, "a", 1), post(ALICE, "c", 3)])
    assert stats.upserted == 0 and stats.skipped == 2 and stats.typed == 0
    assert await conn.fetchval("SELECT count(*) FROM records WHERE did = $1", ALICE) == 0


async def test_writes_and_deletion_in_one_batch(conn: asyncpg.Connection) -> None:
    await apply_batch(
        conn,
        Batch(
            writes=[post(ALICE, "a", 1)],
            accounts=[AccountEvent(5, ALICE, None, active=False, status="deleted")],
        ),
    )
    assert await rows(conn, "records") == {}


@pytest.mark.parametrize("status", ["deactivated", "takendown", "suspended", "desynchronized"])
async def test_reversible_statuses_keep_rows(conn: asyncpg.Connection, status: str) -> None:
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 1)]))
    await apply_batch(
        conn, Batch(accounts=[AccountEvent(2, ALICE, None, active=False, status=status)])
    )
    row = await conn.fetchrow("SELECT status, active FROM actors WHERE did = $1", ALICE)
    assert (row["status"], row["active"]) == (status, False)
    assert len(await rows(conn, "records")) == 1
    await apply_batch(conn, Batch(accounts=[AccountEvent(3, ALICE, None, active=True)]))
    row = await conn.fetchrow("SELECT status, active FROM actors WHERE did = $1", ALICE)
    assert (row["status"], row["active"]) == ("active", True)
    assert len(await rows(conn, "posts")) == 1


async def test_account_and_identity_events_in_seq_order(conn: asyncpg.Connection) -> None:
    await apply_batch(
        conn,
        Batch(
            identities=[
                IdentityEvent(3, ALICE, None, "new.test"),
                IdentityEvent(1, ALICE, None, "old.test"),
                IdentityEvent(2, BOB, None, "bob.test"),
            ],
            accounts=[
                AccountEvent(9, BOB, None, active=True),
                AccountEvent(4, BOB, None, active=False, status="takendown"),
            ],
        ),
    )
    got = {r["did"]: r for r in await conn.fetch("SELECT * FROM actors")}
    assert got[ALICE]["handle"] == "new.test" and got[ALICE]["status"] == "active"
    assert got[BOB]["status"] == "active" and got[BOB]["seq"] == 9
    # A None handle keeps the stored one.
    await apply_batch(conn, Batch(identities=[IdentityEvent(10, ALICE, None, None)]))
    assert await conn.fetchval("SELECT handle FROM actors WHERE did = $1", ALICE) == "new.test"


async def test_actor_head_never_goes_backwards(conn: asyncpg.Connection) -> None:
    heads = [(ALICE, tid(4), "bafyd4"), (ALICE, tid(5), "bafyd5"), (ALICE, tid(4), None)]
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 5)]), heads=heads)
    await write_snapshot(conn, [post(ALICE, "b", 3)])
    row = await conn.fetchrow("SELECT rev, data_cid FROM actors WHERE did = $1", ALICE)
    assert (row["rev"], row["data_cid"]) == (tid(5), "bafyd5")
    stats = await apply_batch(conn, Batch(writes=[post(ALICE, "c", 6)]))
    assert stats.heads == 1
    assert await conn.fetchval("SELECT rev FROM actors WHERE did = $1", ALICE) == tid(6)


async def test_cursor_rolls_back_with_the_batch(conn: asyncpg.Connection) -> None:
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 1)], cursor=100))
    # Make a statement of the next batch fail (after the records upsert ran).
    await conn.execute(
        "ALTER TABLE likes ADD CONSTRAINT no_likes CHECK (subject_uri <> 'at://boom')"
    )
    bad = Batch(writes=[post(ALICE, "b", 2), like(ALICE, "l", 2, "at://boom")], cursor=200)
    with pytest.raises(asyncpg.CheckViolationError):
        await apply_batch(conn, bad)
    assert await load_cursor(conn, "firehose") == 100
    assert set(await rows(conn, "records")) == {post(ALICE, "a", 1).uri}
    # The connection is usable afterwards (staging tables recreated as needed).
    await conn.execute("ALTER TABLE likes DROP CONSTRAINT no_likes")
    await apply_batch(conn, bad)
    assert await load_cursor(conn, "firehose") == 200
    assert len(await rows(conn, "records")) == 3


async def test_cursor_none_keeps_cursor(conn: asyncpg.Connection) -> None:
    assert await load_cursor(conn, "firehose") is None
    t = datetime(2024, 1, 1, tzinfo=UTC)
    await apply_batch(conn, Batch(cursor=7, last_event_time=t), service="firehose:1")
    await apply_batch(conn, Batch(writes=[post(ALICE, "a", 1)]), service="firehose:1")
    assert await load_cursor(conn, "firehose:1") == 7
    assert await load_cursor(conn, "firehose") is None
    await save_cursor(conn, "backfill", 3)
    row = await conn.fetchrow("SELECT * FROM firehose_cursor WHERE service = 'backfill'")
    assert row["cursor"] == 3 and row["updated_at"] is not None
    await save_cursor(conn, "firehose:1", 8)  # NULL time keeps the stored one
    assert (
        await conn.fetchval(
            "SELECT last_event_time FROM firehose_cursor WHERE service = $1", "firehose:1"
        )
        == t
    )


async def test_nested_in_caller_transaction(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await apply_batch(conn, Batch(writes=[post(ALICE, "a", 1)]))
        await apply_batch(conn, Batch(writes=[post(ALICE, "b", 1)]))
    assert len(await rows(conn, "records")) == 2


async def test_nul_and_hostile_values_stored(conn: asyncpg.Connection) -> None:
    sanitized = RecordWrite(
        ALICE, POST, "s", tid(1), Action.CREATE, "bafys", {"text": "a\ufffdb"}, sanitized=True
    )
    raw_nul = RecordWrite(
        ALICE, POST, "n", tid(1), Action.CREATE, "bafyn", {"te\x00xt": "a\x00b", "text": "c\x00"}
    )
    surrogate = RecordWrite(ALICE, POST, "u", tid(1), Action.CREATE, "bafyu", {"text": "x\ud800"})
    huge = RecordWrite(ALICE, POST, "h" * 3000, tid(1), Action.CREATE, "bafyh", {"text": "x"})
    no_record = RecordWrite(ALICE, POST, "r", tid(1), Action.CREATE, "bafyr", None)
    nul_key = RecordWrite(ALICE, POST, "k\x00", tid(1), Action.CREATE, "bafyk", {"text": "x"})
    big_int = RecordWrite(ALICE, "x.y.z", "i", tid(1), Action.CREATE, "bafyi", {"n": 2**70})
    stats = await apply_batch(
        conn, Batch(writes=[sanitized, raw_nul, surrogate, huge, no_record, nul_key, big_int])
    )
    assert stats.upserted == 4 and stats.invalid == 3 and stats.sanitized == 1
    texts = {r["rkey"]: r["text"] for r in await conn.fetch("SELECT rkey, text FROM posts")}
    assert texts == {"s": "a\ufffdb", "n": "c\ufffd", "u": "x?"}
    rec = await conn.fetchval("SELECT record->>'te\ufffdxt' FROM records WHERE rkey = 'n'")
    assert rec == "a\ufffdb"
    assert await conn.fetchval("SELECT record->>'n' FROM records WHERE rkey = 'i'") == str(2**70)


async def test_unknown_collection_only_in_records(conn: asyncpg.Connection) -> None:
    w = RecordWrite(ALICE, "com.example.thing", "t", tid(1), Action.CREATE, "bafyt", {"a": [1]})
    stats = await apply_batch(conn, Batch(writes=[w]))
    assert (stats.upserted, stats.typed) == (1, 0)
    await apply_batch(conn, Batch(writes=[delete(ALICE, "com.example.thing", "t", 2)]))
    assert await rows(conn, "records") == {}


def test_stats_add() -> None:
    a, b = ApplyStats(upserted=1, skipped=2), ApplyStats(upserted=3, purged=1)
    a.add(b)
    assert (a.upserted, a.skipped, a.purged) == (4, 2, 1)


def test_prepare_steps_suspends_and_builds_the_same_batch() -> None:
    # The worker runs prepare_steps on the event loop that carries the previous batch's
    # transaction: it must suspend every PREPARE_STEP_WRITES writes (rows, then JSON parts),
    # and the JSON built in parts must be the one-call JSON of all the rows.
    n = PREPARE_STEP_WRITES * 5 + 3
    writes = [post(ALICE, f"p{i:05}", 1 + i % 7, f"t{i}") for i in range(n)]
    writes += [like(BOB, f"l{i:05}", 2) for i in range(n)]
    writes.append(RecordWrite(ALICE, POST, "nul", tid(9), Action.CREATE, "c", {"text": "a\x00"}))
    steps = prepare_steps(Batch(writes=writes))
    suspensions = 0
    while True:
        try:
            next(steps)
            suspensions += 1
        except StopIteration as done:
            prepared = done.value
            break
    # the dedupe pass, the rows pass and the JSON parts each suspend every PREPARE_STEP_WRITES
    assert suspensions >= 3 * (len(writes) // PREPARE_STEP_WRITES) - 1
    whole = prepare_batch(Batch(writes=writes))
    assert prepared.records == whole.records == records_json(whole.rows.records)
    stored = {row[3]: row[6] for row in json.loads(prepared.records)}
    assert stored["nul"] == {"text": "a\ufffd"}  # its part took record_json's fallback
    assert prepared.typed == whole.typed and prepared.stats == whole.stats
    assert len(prepared.rows.records) == 2 * n + 1


async def test_rows_sent_is_set_while_the_transaction_is_open(conn: asyncpg.Connection) -> None:
    # The worker prepares its next batch once `rows_sent` is set: that must happen while the
    # batch's transaction still runs (a waiter wakes before any reply to the rows statement
    # can resume the transaction), and for a batch without rows as well.
    rows_sent = asyncio.Event()
    seen: list[bool] = []

    async def look() -> None:
        await rows_sent.wait()
        seen.append(conn.is_in_transaction())

    watcher = asyncio.create_task(look())
    prepared = prepare_batch(Batch(writes=[post(ALICE, "a", 1)], cursor=5))
    await apply_prepared(conn, prepared, rows_sent=rows_sent)
    await watcher
    assert seen == [True]
    assert not conn.is_in_transaction() and len(await rows(conn, "records")) == 1
    cursor_only = asyncio.Event()
    await apply_prepared(conn, prepare_batch(Batch(cursor=6)), rows_sent=cursor_only)
    assert cursor_only.is_set() and await load_cursor(conn, "firehose") == 6
