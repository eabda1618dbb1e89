"""Small fresh repos loaded together (writer.load_fresh_repos, fresh.group_statement): one
statement loads the repos the database has never seen and writes nothing of the others,
which the guarded path then writes; a row a table refuses fails the statement, and each repo
tries alone. Real PostgreSQL; the races with live batches are those of test_storage_fresh
(its property test draws group loads too)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from test_storage_fresh import (
    KEYS,
    OTHER,
    SNAPSHOT_REV,
    TABLES,
    check_converged,
    records_by_copy,
    run_race,
    write,
)

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, Batch, RecordWrite
from firehose.storage import fresh, writer
from firehose.storage.writer import apply_batch, load_fresh_repos, write_snapshot


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


def snapshot(did: str, n: int = len(KEYS)) -> tuple[list[RecordWrite], writer.RepoHead]:
    writes = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(n)]
    return writes, (did, tid(SNAPSHOT_REV), f"bafydata{did[-4:]}")


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


async def test_small_repos_load_together_and_only_the_fresh_ones(conns: Any) -> None:
    """One statement loads the absent repo and the headless one (an #identity row); it
    writes nothing of a repo with a head, of a deleted account, of a snapshot with a delete
    (never unguarded) or of a second snapshot of one repo. Those then take the guarded path,
    without a second unguarded attempt for the repos the statement found not fresh."""
    a = conns[0]
    new, ident, headed, dead, deleting = (f"did:plc:group{n}" for n in range(5))
    await a.execute(
        "INSERT INTO actors (did, handle) VALUES ($1, 'i.test'), ($2, NULL)", ident, dead
    )
    await a.execute("UPDATE actors SET status = 'deleted' WHERE did = $1", dead)
    live = write(headed, 4, Action.CREATE, SNAPSHOT_REV + 3)
    await apply_batch(a, Batch(writes=[live], cursor=1))
    snaps = [snapshot(new), snapshot(ident, 2), snapshot(headed), snapshot(dead, 1)]
    writes, head = snapshot(deleting, 2)
    snaps.append(([*writes, write(deleting, 3, Action.DELETE, SNAPSHOT_REV)], head))
    snaps.append(snapshot(new, 1))  # the same repo again

    results, sent = await sent_by(a, load_fresh_repos(a, snaps))
    assert len(sent) == 1 and sent[0] == fresh.group_statement(("posts", "likes")).strip()
    loaded = [(s.fresh, s.upserted, s.typed, s.heads) if s else None for s in results]
    assert loaded == [(5, 5, 5, 1), (2, 2, 2, 1), None, None, None, None]
    await check_converged(a, new, snaps[0][0])
    await check_converged(a, ident, snaps[1][0])
    assert await a.fetchval("SELECT handle FROM actors WHERE did = $1", ident) == "i.test"
    assert await a.fetchval("SELECT data_cid FROM actors WHERE did = $1", new) == "bafydataoup0"
    for did in (headed, dead, deleting):
        assert await a.fetchval("SELECT count(*) FROM records WHERE did = $1", did) == (
            1 if did == headed else 0
        )

    # The repo found not fresh goes straight to the guarded statements.
    stats, sent = await sent_by(a, write_snapshot(a, snaps[2][0], heads=[snaps[2][1]]))
    assert (stats.fresh, stats.upserted, stats.skipped) == (0, len(KEYS) - 1, 1)  # live newer
    assert sent[0] == "BEGIN;"
    await check_converged(a, headed, [*snaps[2][0], live])
    dead_stats = await write_snapshot(a, snaps[3][0], heads=[snaps[3][1]])
    assert dead_stats.upserted == 0
    rest = await write_snapshot(a, snaps[4][0], heads=[snaps[4][1]])
    assert rest.fresh == 0 and rest.upserted == 2 and rest.tombstones == 1


async def test_a_refused_row_fails_the_group_and_each_repo_tries_alone(conns: Any) -> None:
    """A row a table refuses (here a records row of the same uri, inserted without a claim,
    which no writer of this schema does) fails the whole statement: nothing of any repo is
    written, every snapshot gets None, and alone the good repo is fresh while the other
    takes the guarded path."""
    a = conns[0]
    bad, good = "did:plc:groupbad", "did:plc:groupgood"
    bad_snap, good_snap = snapshot(bad, 2), snapshot(good, 3)
    first = bad_snap[0][0]
    await a.execute(
        "INSERT INTO records (uri, did, collection, rkey, cid, rev, record)"
        " VALUES ($1, $2, $3, $4, 'bafyold', '2222222222222', '{}')",
        first.uri, bad, first.collection, first.rkey,
    )  # fmt: skip
    assert await load_fresh_repos(a, [good_snap, bad_snap]) == [None, None]
    assert not a.is_in_transaction()
    assert await a.fetchval("SELECT count(*) FROM actors") == 0
    assert await a.fetchval("SELECT count(*) FROM records WHERE did = $1", good) == 0

    alone = await write_snapshot(a, good_snap[0], heads=[good_snap[1]])
    assert alone.fresh == 3
    await check_converged(a, good, good_snap[0])
    guarded = await write_snapshot(a, bad_snap[0], heads=[bad_snap[1]])
    assert guarded.fresh == 0 and guarded.upserted == 2
    await check_converged(a, bad, bad_snap[0])


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
        companion = f"did:plc:aaa{did}"
        assert await a.fetchval("SELECT count(*) FROM records WHERE did = $1", companion) == 1
    by_holder = dict(outcomes[:4])
    assert by_holder["live"] == 0 and by_holder["load"] == 3, outcomes
