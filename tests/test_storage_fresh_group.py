"""Small repos' whole snapshots written together (firehose/storage/together.py): one statement
loads the repos the database has never seen (fresh.group_statement) and writes nothing of
the others, which one guarded transaction then writes; a row a table refuses fails its
statement, and each repo of it tries alone. Real PostgreSQL; the races with live batches are
those of test_storage_fresh (its property test draws these writes too)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields
from typing import Any

import asyncpg
import pytest
from test_storage_fresh import (
    KEYS,
    OTHER,
    SNAPSHOT_REV,
    TABLES,
    check_converged,
    prepared_snapshot,
    records_by_copy,
    run_race,
    write,
)

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, Batch, RecordWrite
from firehose.storage import fresh
from firehose.storage.prepare import RepoHead
from firehose.storage.together import PreparedSnapshot, write_snapshots
from firehose.storage.writer import apply_batch


@pytest.fixture
async def conns(db_dsn: str) -> Any:
    opened = [await asyncpg.connect(db_dsn) for _ in range(3)]
    try:
        await opened[0].execute(f"TRUNCATE {TABLES}")
        with records_by_copy(False):  # and the process's memory of loads starts empty
            yield opened
    finally:
        for conn in opened:
            await conn.close()


@dataclass(slots=True)
class Snap(PreparedSnapshot):
    """A prepared snapshot with the writes it was made of, for the checks."""

    writes: list[RecordWrite] = field(default_factory=list)


def prepared(writes: list[RecordWrite], head: RepoHead, maybe_fresh: bool = True) -> Snap:
    made = prepared_snapshot(writes, head, maybe_fresh)
    return Snap(**{f.name: getattr(made, f.name) for f in fields(made)}, writes=writes)


def snapshot(did: str, n: int = len(KEYS), maybe_fresh: bool = True) -> Snap:
    writes = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(n)]
    return prepared(writes, (did, tid(SNAPSHOT_REV), f"bafydata{did[-4:]}"), maybe_fresh)


async def sent_by(conn: asyncpg.Connection, work: Any) -> tuple[Any, list[str]]:
    """What `work` returned and the statements it sent on `conn`."""
    sent: list[str] = []

    def log(record: Any) -> None:
        sent.append(record.query.strip())

    conn.add_query_logger(log)
    try:
        result = await work
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon, not at once
    finally:
        conn.remove_query_logger(log)
    return result, sent


async def test_small_repos_are_written_together_fresh_or_guarded(conns: Any) -> None:
    """One statement loads the absent repo and the headless one (an #identity row); one
    guarded transaction then writes the repo with a head, the deleted account (nothing of
    it), the snapshot with a delete (never unguarded) and the one the caller knows has a head
    (maybe_fresh false); a second snapshot of one repo goes alone after them."""
    a = conns[0]
    new, ident, headed, dead, deleting, told = (f"did:plc:group{n}" for n in range(6))
    await a.execute(
        "INSERT INTO actors (did, handle) VALUES ($1, 'i.test'), ($2, NULL)", ident, dead
    )
    await a.execute("UPDATE actors SET status = 'deleted' WHERE did = $1", dead)
    live = write(headed, 4, Action.CREATE, SNAPSHOT_REV + 3)
    await apply_batch(a, Batch(writes=[live], cursor=1))
    snaps = [snapshot(new), snapshot(ident, 2), snapshot(headed), snapshot(dead, 1)]
    kept = snapshot(deleting, 2)
    gone = write(deleting, 3, Action.DELETE, SNAPSHOT_REV)
    snaps.append(prepared([*kept.writes, gone], kept.head))
    snaps.append(snapshot(told, 3, maybe_fresh=False))
    snaps.append(snapshot(new, 1))  # the same repo again

    results, sent = await sent_by(a, write_snapshots(a, snaps))
    load = fresh.group_statement(("posts", "likes")).strip()
    # The load; one guarded transaction (BEGIN, the claim, upserts, deletes, heads, COMMIT);
    # the repo again alone (its load's next batch, refused, then its guarded transaction).
    assert sent[:3] == [load, "BEGIN;", fresh.CLAIM.strip()] and sent[6] == "COMMIT;"
    assert sent[7].startswith("WITH c AS (") and sent[8:10] == ["BEGIN;", fresh.CLAIM.strip()]
    assert len(sent) == 12
    fresh_rows = [(s.fresh, s.upserted, s.typed, s.heads) for s in results[:2]]
    assert fresh_rows == [(5, 5, 5, 1), (2, 2, 2, 1)]
    assert [s.fresh for s in results] == [5, 2, 0, 0, 0, 0, 0]
    assert [s.invalid for s in results] == [0] * 7
    assert [s.writes for s in results] == [5, 2, 5, 1, 3, 3, 1]
    # The guarded transaction's rows, counted once: headed's 4 new ones (the live one is
    # newer), deleting's 2 and its tombstone, told's 3; heads for all but the deleted one.
    guarded = results[2]
    assert (guarded.upserted, guarded.skipped, guarded.tombstones) == (9, 1 + 1, 1)
    assert guarded.heads == 3 and results[-1].upserted == 0  # the repo again: replayed

    await check_converged(a, new, snaps[0].writes)
    await check_converged(a, ident, snaps[1].writes)
    assert await a.fetchval("SELECT handle FROM actors WHERE did = $1", ident) == "i.test"
    assert await a.fetchval("SELECT data_cid FROM actors WHERE did = $1", new) == "bafydataoup0"
    await check_converged(a, headed, [*snaps[2].writes, live])
    assert await a.fetchval("SELECT count(*) FROM records WHERE did = $1", dead) == 0
    await check_converged(a, deleting, snaps[4].writes)
    await check_converged(a, told, snaps[5].writes)


async def test_a_refused_row_sends_each_repo_alone(conns: Any) -> None:
    """A row a table refuses (here a records row of the same uri, inserted without a claim,
    which no writer of this schema does) fails the whole load: nothing of any repo is
    written by it, and alone the good repo is fresh while the other takes the guarded
    path."""
    a = conns[0]
    bad, good = "did:plc:groupbad", "did:plc:groupgood"
    bad_snap, good_snap = snapshot(bad, 2), snapshot(good, 3)
    first = bad_snap.writes[0]
    await a.execute(
        "INSERT INTO records (uri, did, collection, rkey, cid, rev, record)"
        " VALUES ($1, $2, $3, $4, 'bafyold', '2222222222222', '{}')",
        first.uri, bad, first.collection, first.rkey,
    )  # fmt: skip
    (good_stats, bad_stats), sent = await sent_by(a, write_snapshots(a, [good_snap, bad_snap]))
    assert sent[0] == fresh.group_statement(("posts", "likes")).strip()
    # Then each alone: good's load; bad's load, refused, then its guarded transaction.
    assert [q[:9] for q in sent[1:4]] == ["WITH u AS", "WITH u AS", "BEGIN;"]
    assert good_stats.fresh == 3
    assert (bad_stats.fresh, bad_stats.upserted) == (0, 2)
    assert not a.is_in_transaction()
    await check_converged(a, good, good_snap.writes)
    await check_converged(a, bad, bad_snap.writes)


# What a hostile repo might meet, set up in this test's own database (no writer of this
# schema meets either): a constraint, and an index entry over btree's 2,704 bytes (90 MD5s,
# which do not compress).
_BIG_ENTRY = " || ".join(f"md5(uri || '{i}')" for i in range(90))
REFUSALS = {
    "constraint": ("ALTER TABLE records ADD CONSTRAINT hostile CHECK (did <> '{bad}')", "23514"),
    "index entry": (
        f"CREATE INDEX hostile ON records ((CASE WHEN did = '{{bad}}' THEN {_BIG_ENTRY} END))",
        "54000",
    ),
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
@pytest.mark.parametrize("refused", ["guarded", "guarded alone", "fresh"])
async def test_a_refused_repo_fails_alone(conns: Any, refused: str, how: str) -> None:
    """A repo whose rows PostgreSQL refuses gets its own error and no row; every other repo
    of its group is written, fresh or guarded. Before, its error failed the whole group: a
    hostile repo cost each repo it shared a statement with an attempt."""
    a = conns[0]
    fresh_did, headed, bad = "did:plc:groupfine", "did:plc:groupheaded", "did:plc:grouphostile"
    ddl, sqlstate = REFUSALS[how]
    await a.execute(ddl.format(bad=bad))
    maybe_fresh = refused == "fresh"
    snaps = [snapshot(fresh_did), snapshot(bad, 2, maybe_fresh=maybe_fresh)]
    if refused != "guarded alone":
        snaps.append(snapshot(headed, 3, maybe_fresh=False))
    results = await write_snapshots(a, snaps)
    assert isinstance(results[1], asyncpg.PostgresError), results
    assert results[1].sqlstate == sqlstate
    assert [type(r).__name__ for i, r in enumerate(results) if i != 1] == ["ApplyStats"] * (
        len(snaps) - 1
    )
    assert results[0].fresh == len(KEYS)
    assert not a.is_in_transaction()
    await check_converged(a, fresh_did, snaps[0].writes)
    if len(snaps) == 3:
        await check_converged(a, headed, snaps[2].writes)
    assert await a.fetchval("SELECT count(*) FROM records WHERE did = $1", bad) == 0


async def test_a_lost_connection_fails_the_repos_of_its_statements(conns: Any) -> None:
    """The connection dies under the group: each repo gets that error (the repos are
    retried; writing them again is idempotent) and the call itself returns."""
    a, b, _ = conns
    pid = a.get_server_pid()
    await b.execute("SELECT pg_terminate_backend($1)", pid)
    gone = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)"
    for _ in range(1000):  # the backend exits soon, not at once
        if await b.fetchval(gone, pid):
            break
        await asyncio.sleep(0.01)
    snaps = [snapshot("did:plc:grouplost1"), snapshot("did:plc:grouplost2", 2, False)]
    results = await write_snapshots(a, snaps)
    assert all(isinstance(r, asyncpg.PostgresError | asyncpg.InterfaceError) for r in results)


async def test_group_races_take_both_paths(conns: Any) -> None:
    """The group's races (test_storage_fresh's property test draws them) are not vacuous:
    with the live batch's claim held, the group finds the repo not fresh and the guarded
    path writes it; with the group's statement held open, the live batch waits and the repo
    is loaded unguarded. Either way it converges, and the group's other repo is loaded."""
    a, b, c = conns
    outcomes = []
    for i, holder in enumerate(["live", "load", "mid-live", "none"] * 2):
        await a.execute(f"TRUNCATE {TABLES}")
        await apply_batch(a, Batch(writes=[write(OTHER, 2, Action.CREATE, 1)]))
        did = f"did:plc:groupboth{i}"
        loads = [[write(did, k, Action.CREATE, SNAPSHOT_REV) for k in (0, 2, 3)]]
        live = [write(did, 2, Action.DELETE, SNAPSHOT_REV + 1)]
        race = {
            "did": did, "loads": loads, "live": live, "holder": holder, "at": 0,
            "delay_ms": 5, "guarded": False, "group": True,
        }  # fmt: skip
        with records_by_copy(False):
            n = await asyncio.wait_for(run_race(a, b, c, race), 60)
        outcomes.append((holder, n))
        await check_converged(a, did, loads[0] + live)
        for companion in (f"did:plc:aaa{did}", f"did:plc:zzz{did}"):
            count = "SELECT count(*) FROM records WHERE did = $1"
            assert await a.fetchval(count, companion) == 1
    by_holder = dict(outcomes[:4])
    assert by_holder["live"] == 0 and by_holder["load"] == 3, outcomes
