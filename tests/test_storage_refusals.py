"""The parts of a live batch PostgreSQL refuses (firehose/storage/refusals.py), found by probes
that never commit. Real PostgreSQL; the refusals are made by constraints and an index added
for the test, standing for whatever the writer's screening did not foresee."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import AccountEvent, Action, Batch, IdentityEvent, RecordWrite
from firehose.storage import refusals
from firehose.storage.writer import apply_batch

POST = "app.bsky.feed.post"
TABLES = "records, posts, actors, record_tombstones, repo_resyncs, firehose_cursor"
# What the test's constraints refuse: a record's text, a handle, an account status.
HOSTILE = (
    "ALTER TABLE records ADD CONSTRAINT hostile_text CHECK (record->>'text' <> 'refused')",
    "ALTER TABLE actors ADD CONSTRAINT hostile_handle CHECK (handle <> 'refused.test')",
    "ALTER TABLE actors ADD CONSTRAINT hostile_status CHECK (status <> 'refused')",
)


@pytest.fixture
async def hostile(conn: asyncpg.Connection) -> asyncpg.Connection:
    for statement in HOSTILE:
        await conn.execute(statement)
    return conn


def did(i: int) -> str:
    return f"did:plc:{i:024d}"


def post(i: int, text: str, rev: int = 5) -> RecordWrite:
    return RecordWrite(
        did=did(i % 7),
        collection=POST,
        rkey=tid(1_000 + i),
        rev=tid(rev),
        action=Action.CREATE,
        cid=f"bafypost{i}",
        record={"$type": POST, "text": text, "createdAt": "2024-05-01T12:00:00Z"},
    )


async def stored(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        "records": await conn.fetchval("SELECT count(*) FROM records"),
        "posts": await conn.fetchval("SELECT count(*) FROM posts"),
        "actors": await conn.fetchval("SELECT count(*) FROM actors"),
    }


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(refused=st.lists(st.booleans(), min_size=1, max_size=40))
async def test_exactly_the_refused_writes_are_found_and_nothing_commits(
    hostile: asyncpg.Connection, refused: list[bool]
) -> None:
    conn = hostile
    await conn.execute(f"TRUNCATE {TABLES}")  # one database for all examples
    writes = [post(i, "refused" if bad else f"post {i}") for i, bad in enumerate(refused)]
    batch = Batch(writes=writes, cursor=42, events=len(writes))

    found = await refusals.find_refused(conn, batch)

    assert [r.part for r in found] == [w for w, bad in zip(writes, refused, strict=True) if bad]
    assert all(r.field == "writes" for r in found)
    assert all(isinstance(r.error, asyncpg.CheckViolationError) for r in found)
    # The probes rolled back: nothing of the batch is stored, and no cursor.
    assert await stored(conn) == {"records": 0, "posts": 0, "actors": 0}
    assert await conn.fetchval("SELECT count(*) FROM firehose_cursor") == 0

    rest = refusals.without(batch, found)
    assert rest.cursor == 42 and rest.events == len(writes)
    await apply_batch(conn, rest)
    kept = refused.count(False)
    assert await stored(conn) | {"actors": 0} == {"records": kept, "posts": kept, "actors": 0}
    assert await conn.fetchval("SELECT cursor FROM firehose_cursor") == 42


async def test_identities_accounts_and_heads_are_parts_too(hostile: asyncpg.Connection) -> None:
    conn = hostile
    bad_identity = IdentityEvent(seq=3, time=None, did=did(1), handle="refused.test")
    bad_account = AccountEvent(seq=4, time=None, did=did(2), active=False, status="refused")
    batch = Batch(
        writes=[post(0, "fine"), post(1, "refused")],
        identities=[IdentityEvent(seq=1, time=None, did=did(3), handle="fine.test"), bad_identity],
        accounts=[
            AccountEvent(seq=2, time=None, did=did(4), active=False, status="takendown"),
            bad_account,
        ],
        heads=[(did(0), tid(5), "bafydata0"), (did(1), tid(5), "bafydata1")],
        resyncs=[(did(5), "gap")],
        cursor=7,
        events=7,
    )
    found = await refusals.find_refused(conn, batch)
    by_field = {r.field: r for r in found}
    assert set(by_field) == {"writes", "identities", "accounts"}
    assert by_field["writes"].part is batch.writes[1]
    assert by_field["identities"].part is bad_identity
    assert by_field["accounts"].part is bad_account
    assert "at rev" in by_field["writes"].describe()
    assert by_field["identities"].describe() == f"identity event of {did(1)} at seq 3"
    assert by_field["accounts"].describe() == f"account event of {did(2)} at seq 4"

    await apply_batch(conn, refusals.without(batch, found), heads=batch.heads)
    handles = dict(await conn.fetch("SELECT did, handle FROM actors WHERE handle IS NOT NULL"))
    assert handles == {did(3): "fine.test"}
    statuses = dict(await conn.fetch("SELECT did, status FROM actors WHERE status <> 'active'"))
    assert statuses == {did(4): "takendown"}
    assert await conn.fetchval("SELECT count(*) FROM records") == 1
    assert await conn.fetchval("SELECT count(*) FROM repo_resyncs WHERE did = $1", did(5)) == 1
    assert await conn.fetchval("SELECT cursor FROM firehose_cursor") == 7


async def test_parts_the_writer_passes_over_are_never_blamed(
    hostile: asyncpg.Connection,
) -> None:
    """A write superseded by a later one of its uri, or an identity event followed by
    another of its did, is not written: refused on its own, it is still not counted."""
    conn = hostile
    superseded = post(0, "refused", rev=5)
    winner = replace(post(0, "fine", rev=6), cid="bafywinner")
    refused = post(1, "refused")
    old_identity = IdentityEvent(seq=1, time=None, did=did(2), handle="refused.test")
    new_identity = IdentityEvent(seq=2, time=None, did=did(2), handle="fine.test")
    batch = Batch(
        writes=[superseded, winner, refused],
        identities=[old_identity, new_identity],
        cursor=3,
        events=3,
    )
    assert [p for _, p in refusals.parts_of(batch)] == [winner, refused, new_identity]
    found = await refusals.find_refused(conn, batch)
    assert [r.part for r in found] == [refused]

    await apply_batch(conn, refusals.without(batch, found))
    assert await conn.fetchval("SELECT cid FROM records") == "bafywinner"
    assert await conn.fetchval("SELECT handle FROM actors WHERE did = $1", did(2)) == "fine.test"


async def test_an_oversized_index_entry_is_found(conn: asyncpg.Connection) -> None:
    """btree refuses an entry over 2,704 bytes (ProgramLimitExceededError): an index on a
    record field the writer does not screen, as an operator might add one."""
    await conn.execute("CREATE INDEX hostile_title ON records ((record->>'title'))")
    big = post(1, "fine")
    assert big.record is not None
    big.record["title"] = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000))
    batch = Batch(writes=[post(0, "fine"), big, post(2, "fine")], cursor=1, events=3)
    found = await refusals.find_refused(conn, batch)
    assert [r.part for r in found] == [big]
    assert isinstance(found[0].error, asyncpg.ProgramLimitExceededError)


async def test_a_refusal_no_part_makes_alone_isolates_nothing(conn: asyncpg.Connection) -> None:
    """Two writes refused only together (a deferred check on their count): no part is
    blamed, and the caller retries the whole batch as for any other error."""
    await conn.execute(
        """
        CREATE FUNCTION hostile_pair() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT count(*) FROM records WHERE record->>'text' = 'pair') > 1 THEN
            RAISE check_violation USING MESSAGE = 'a pair';
          END IF;
          RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER hostile_pair AFTER INSERT ON records
          DEFERRABLE INITIALLY IMMEDIATE FOR EACH ROW EXECUTE FUNCTION hostile_pair();
        """
    )
    batch = Batch(writes=[post(0, "pair"), post(1, "pair")], cursor=1, events=2)
    with pytest.raises(asyncpg.CheckViolationError):
        await apply_batch(conn, Batch(writes=list(batch.writes)))
    assert await refusals.find_refused(conn, batch) == []


def test_parts_and_probe_batches_keep_every_field() -> None:
    batch = Batch(
        writes=[post(0, "a")],
        identities=[IdentityEvent(seq=1, time=None, did=did(1), handle="h.test")],
        accounts=[AccountEvent(seq=2, time=None, did=did(2), active=True, status=None)],
        heads=[(did(0), tid(5), None)],
        resyncs=[(did(3), "gap")],
        cursor=9,
        events=3,
    )
    parts = refusals.parts_of(batch)
    assert [name for name, _ in parts] == list(refusals.PART_FIELDS)
    probe: Any = refusals.probe_batch(parts)
    for name in refusals.PART_FIELDS:
        assert getattr(probe, name) == getattr(batch, name)
    assert probe.cursor is None and probe.events == 0
    assert refusals.without(batch, []) == batch
