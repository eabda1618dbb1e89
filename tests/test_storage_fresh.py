"""Fresh repos loaded without guards (firehose/storage/fresh.py) converge with live writes that race
them: real PostgreSQL, two connections, each holding its transaction open while the other
runs, in every order (invariant 2). With a repo the live stream wrote before, the same races
run against the guarded snapshot path: every writer takes the repo's `actors` row first, so
none of them deadlocks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, Batch, RecordWrite
from firehose.storage import copy_text, fresh, queries, snapshots
from firehose.storage.fresh import Loads
from firehose.storage.prepare import ApplyStats, RepoHead, prepare
from firehose.storage.snapshots import write_snapshot
from firehose.storage.together import PreparedSnapshot, prepare_snapshot, write_snapshots
from firehose.storage.writer import apply_batch

# (collection, rkey): a few uris over two typed tables.
KEYS = [
    ("app.bsky.feed.post", "3kaaa"),
    ("app.bsky.feed.post", "3kbbb"),
    ("app.bsky.feed.like", "3kccc"),
    ("app.bsky.feed.like", "3kddd"),
    ("app.bsky.feed.like", "3keee"),
]
TABLES = "records, posts, likes, record_tombstones, actors"
SNAPSHOT_REV = 2**39  # live ops get revs on both sides of it
# Another repo, whose uris sort after every fresh one's: the live batch of a race deletes its
# like, which a third connection can hold locked to stop the live batch mid-way.
OTHER = "did:plc:zzzother"
_dids = itertools.count()


def write(did: str, key: int, action: Action, rev: int) -> RecordWrite:
    collection, rkey = KEYS[key]
    if action is Action.DELETE:
        return RecordWrite(did, collection, rkey, tid(rev), action)
    record: dict[str, Any] = {"$type": collection, "createdAt": "2024-01-01T00:00:00Z"}
    if collection == "app.bsky.feed.post":
        record["text"] = f"rev {rev}"
    else:
        record["subject"] = {"uri": f"at://did:plc:x/app.bsky.feed.post/{rev}", "cid": "bafys"}
    return RecordWrite(did, collection, rkey, tid(rev), action, f"bafy{rev}", record)


def expected(ops: list[RecordWrite]) -> dict[str, tuple[str, str]]:
    """uri -> (rev, cid) of the op with the highest rev, for uris whose last op is no delete."""
    best: dict[str, RecordWrite] = {}
    for op in ops:
        if op.uri not in best or best[op.uri].rev < op.rev:
            best[op.uri] = op
    return {
        uri: (op.rev, op.cid)
        for uri, op in best.items()
        if op.action is not Action.DELETE and op.cid is not None
    }


async def table_state(conn: asyncpg.Connection, table: str, did: str) -> dict[str, tuple[str, str]]:
    rows = await conn.fetch(f"SELECT uri, rev, cid FROM {table} WHERE did = $1", did)  # constant
    return {r["uri"]: (r["rev"], r["cid"]) for r in rows}


async def check_converged(conn: asyncpg.Connection, did: str, ops: list[RecordWrite]) -> None:
    want = expected(ops)
    assert await table_state(conn, "records", did) == want
    typed = await table_state(conn, "posts", did) | await table_state(conn, "likes", did)
    assert typed == want
    # No tombstone lets a record through that is older than it.
    for r in await conn.fetch("SELECT uri, rev FROM record_tombstones WHERE did = $1", did):
        assert r["uri"] not in want or want[r["uri"]][0] > r["rev"]
    head = await conn.fetchval("SELECT rev FROM actors WHERE did = $1", did)
    assert head == max(op.rev for op in ops)


@st.composite
def races(draw: st.DrawFn) -> dict[str, Any]:
    did = f"did:plc:fresh{next(_dids)}"
    keys = draw(st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=5, unique=True))
    snapshot = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in sorted(keys)]
    cut = draw(st.integers(0, len(snapshot)))
    loads = [b for b in (snapshot[:cut], snapshot[cut:]) if b]
    n = draw(st.integers(1, 6))
    revs = draw(
        st.lists(
            st.integers(SNAPSHOT_REV - 1000, SNAPSHOT_REV + 1000).filter(
                lambda r: r != SNAPSHOT_REV
            ),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    live = [
        write(
            did,
            draw(st.integers(0, len(KEYS) - 1)),
            draw(st.sampled_from([Action.CREATE, Action.UPDATE, Action.DELETE])),
            rev,
        )
        for rev in revs
    ]
    return {
        "did": did,
        "loads": loads,
        "live": live,
        # who holds an open transaction while the other side runs, and around which load
        # batch: "live" (the live batch uncommitted), "load" (a load batch uncommitted),
        # "mid-live" (the live batch stopped between its rows and its cursor, see
        # run_race), "none" (both just run concurrently)
        "holder": draw(st.sampled_from(["live", "load", "mid-live", "none"])),
        "at": draw(st.integers(0, len(loads) - 1)),
        "delay_ms": draw(st.integers(0, 30)),
        # A repo the live stream committed before (a chain head, older than every op here):
        # the snapshot then takes the guarded path, and both writers' lock order is tested.
        "chained": draw(st.booleans()),
        # the load's records rows sent by COPY (snapshots.FRESH_COPY_MIN_RECORDS) or in its
        # statement
        "copy": draw(st.booleans()),
        # the snapshot told the repo has a head (write_snapshot's maybe_fresh=False, as a
        # backfill claim says it, backfill.queue.Claimed.headed): the guarded path from the
        # first batch, its heads in its upserts' statement
        "guarded": draw(st.booleans()),
        # a snapshot of one batch written with another repo's (together.write_snapshots, as
        # the backfill writes small repos): loaded in one statement with it, or guarded
        "group": draw(st.booleans()),
    }


@contextlib.contextmanager
def records_by_copy(on: bool) -> Iterator[list[int]]:
    """Fresh loads send their records rows by COPY (every batch) or in the load's statement
    (none); yields the list of COPY sizes, one per batch sent by COPY, to show which path ran.
    The process's memory of loads under way (snapshots.fresh_loads) starts empty, as the
    database does: a test run twice must not find its dids' loads of the first run."""
    sizes: list[int] = []

    def counted(rows: list[Any]) -> bytes:
        sizes.append(len(rows))
        return copy_text.records_copy(rows)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(snapshots, "FRESH_COPY_MIN_RECORDS", 1 if on else 10**9)
        m.setattr(snapshots, "records_copy", counted)
        m.setattr(snapshots, "fresh_loads", Loads())
        yield sizes


def prepared_snapshot(
    writes: list[RecordWrite], head: RepoHead, maybe_fresh: bool = True
) -> PreparedSnapshot:
    """A whole snapshot of `writes` for together.write_snapshots, its rows by the generic
    steps (which tests/test_snapshot_rows.py holds the backfill's own ones to)."""
    stats = ApplyStats()
    rows = prepare(Batch(writes=writes), stats, [head])
    return prepare_snapshot(rows, stats, head, maybe_fresh)


async def _load(
    conn: asyncpg.Connection,
    did: str,
    batch: list[RecordWrite],
    last: bool,
    guarded: bool = False,
    group: bool = False,
) -> Any:
    head = [(did, tid(SNAPSHOT_REV), "bafydata")] if last else None
    if group and head is not None:
        # With a fresh repo whose did sorts first (the load claims two rows when this one is
        # fresh too) and one written guarded, whose did sorts after (the guarded
        # transaction writes two repos when this one is not fresh).
        first, last = f"did:plc:aaa{did}", f"did:plc:zzz{did}"
        prepared = [
            prepared_snapshot(batch, head[0], maybe_fresh=not guarded),
            prepared_snapshot([write(first, 0, Action.CREATE, 5)], (first, tid(5), None)),
            prepared_snapshot([write(last, 1, Action.CREATE, 5)], (last, tid(5), None), False),
        ]
        stats, loaded, _ = await write_snapshots(conn, prepared)
        assert loaded.fresh == 1
        return stats
    return await write_snapshot(conn, batch, heads=head, maybe_fresh=not guarded)


async def waiting(c: asyncpg.Connection, conn: asyncpg.Connection) -> bool:
    """Whether `conn`'s backend waits for a lock (pg_locks is read live, not snapshotted)."""
    n = await c.fetchval(
        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", conn.get_server_pid()
    )
    return bool(n)


async def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.002)


async def run_race(
    a: asyncpg.Connection, b: asyncpg.Connection, c: asyncpg.Connection, race: dict[str, Any]
) -> int:
    """Live batch on `a`, the fresh load on `b`, `c` to hold the live batch mid-way. The rows
    loaded unguarded."""
    did, loads, holder, at = race["did"], race["loads"], race["holder"], race["at"]
    guarded = race["guarded"]
    group = race.get("group", False) and len(loads) == 1
    other_like = write(OTHER, 2, Action.DELETE, 2)
    live_batch = Batch(writes=[*race["live"], other_like], cursor=1)
    stats: list[ApplyStats] = []
    delay_s = race["delay_ms"] / 1000

    async def load_batches(indexes: range) -> None:
        for i in indexes:
            stats.append(await _load(b, did, loads[i], i == len(loads) - 1, guarded, group))

    await load_batches(range(at))
    if holder == "live":
        tr = a.transaction()
        await tr.start()
        await apply_batch(a, live_batch)  # in the open transaction: not committed yet
        other = asyncio.create_task(load_batches(range(at, len(loads))))
        await asyncio.sleep(delay_s)  # the load runs (or waits on the live batch's claim)
        await tr.commit()
        await other
    elif holder == "load":
        tr = b.transaction()
        await tr.start()
        stats.append(await _load(b, did, loads[at], at == len(loads) - 1, guarded, group))
        live_task = asyncio.create_task(apply_batch(a, live_batch))
        await asyncio.sleep(delay_s)  # the live batch runs (or waits on the load's claim)
        await tr.commit()
        await live_task
        await load_batches(range(at + 1, len(loads)))
    elif holder == "mid-live":
        # `c` holds the other repo's like: the live batch claims, writes its rows and its
        # tombstones, then waits in its deletes, uncommitted and before its repo heads, while
        # the load runs (or waits on the claim).
        tr = c.transaction()
        await tr.start()
        await c.execute("SELECT 1 FROM records WHERE uri = $1 FOR UPDATE", other_like.uri)
        live_task = asyncio.create_task(apply_batch(a, live_batch))
        await wait_for(lambda: waiting(c, a), "the live batch at the other repo's like")
        load_task = asyncio.create_task(load_batches(range(at, len(loads))))

        async def load_done_or_waiting() -> bool:
            return load_task.done() or await waiting(c, b)

        await wait_for(load_done_or_waiting, "the load done or waiting")
        await tr.commit()
        await asyncio.gather(live_task, load_task)
    else:
        await asyncio.gather(apply_batch(a, live_batch), load_batches(range(at, len(loads))))
    return sum(s.fresh for s in stats)


@pytest.fixture
async def conns(db_dsn: str) -> Any:
    opened = [await asyncpg.connect(db_dsn) for _ in range(3)]
    try:
        yield opened
    finally:
        for conn in opened:
            await conn.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(race=races())
async def test_fresh_load_and_live_batch_converge(conns: Any, race: dict[str, Any]) -> None:
    a, b, c = conns
    await a.execute(f"TRUNCATE {TABLES}")
    await apply_batch(a, Batch(writes=[write(OTHER, 2, Action.CREATE, 1)]))
    earlier = [write(race["did"], 0, Action.CREATE, SNAPSHOT_REV - 2000)] if race["chained"] else []
    if earlier:
        await apply_batch(a, Batch(writes=earlier))
    with records_by_copy(race["copy"]):
        fresh = await asyncio.wait_for(run_race(a, b, c, race), 60)
    assert not (fresh and race["chained"]), "a repo the live stream wrote is never fresh"
    assert not (fresh and race["guarded"]), "maybe_fresh=False never loads unguarded"
    snapshot = [w for batch in race["loads"] for w in batch]
    await check_converged(a, race["did"], earlier + snapshot + race["live"])


@pytest.mark.parametrize("by_copy", [False, True])
async def test_fresh_repo_is_loaded_unguarded_and_a_known_one_is_not(
    conns: Any, by_copy: bool
) -> None:
    """The unguarded path is taken exactly when the repo is fresh and still ours."""
    with records_by_copy(by_copy) as sizes:
        await _loaded_unguarded_or_not(conns)
    assert bool(sizes) == by_copy


async def _loaded_unguarded_or_not(conns: Any) -> None:
    a = conns[0]
    new = "did:plc:freshnew"
    snap = [write(new, k, Action.CREATE, SNAPSHOT_REV) for k in range(len(KEYS))]
    first = await write_snapshot(a, snap[:2])
    assert (first.fresh, first.upserted, first.typed) == (2, 2, 2)
    second = await _load(a, new, snap[2:], True)  # the next batch: still ours
    assert second.fresh == 3
    await check_converged(a, new, snap)

    # A live commit in between ends the load's ownership: the next batch is guarded.
    did = "did:plc:freshcut"
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(len(KEYS))]
    assert (await write_snapshot(a, snap[:2])).fresh == 2
    newer = write(did, 0, Action.DELETE, SNAPSHOT_REV + 5)
    await apply_batch(a, Batch(writes=[newer], cursor=7))
    rest = await write_snapshot(a, snap[2:])
    assert rest.fresh == 0 and rest.upserted == 3
    await check_converged(a, did, [*snap, newer])

    # A repo the live stream has written (tombstone, head) is never loaded unguarded, and an
    # older snapshot does not resurrect what the stream deleted.
    did = "did:plc:freshknown"
    gone = write(did, 1, Action.DELETE, SNAPSHOT_REV + 9)
    await apply_batch(a, Batch(writes=[gone], cursor=8))
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(len(KEYS))]
    known = await write_snapshot(a, snap)
    assert known.fresh == 0 and known.upserted == len(KEYS) - 1
    await check_converged(a, did, [*snap, gone])

    # A headless actors row (an #identity event, a backfill handle) is still fresh; a deleted
    # account is not.
    await a.execute(
        "INSERT INTO actors (did, handle) VALUES ('did:plc:freshid', 'a.test'),"
        " ('did:plc:freshdead', NULL)"
    )
    await a.execute("UPDATE actors SET status = 'deleted' WHERE did = 'did:plc:freshdead'")
    snap = [write("did:plc:freshid", 0, Action.CREATE, SNAPSHOT_REV)]
    assert (await write_snapshot(a, snap)).fresh == 1
    assert await a.fetchval("SELECT handle FROM actors WHERE did = 'did:plc:freshid'") == "a.test"
    dead = await write_snapshot(a, [write("did:plc:freshdead", 0, Action.CREATE, SNAPSHOT_REV)])
    assert dead.fresh == 0 and dead.upserted == 0


async def test_a_guarded_snapshot_batch_sends_its_heads_with_its_rows(conns: Any) -> None:
    """A snapshot batch without deletes on the guarded path is four round trips: BEGIN, the
    claim, the upserts with the repo heads (queries.snapshot_upserts_statement), COMMIT; told
    the repo has a head (maybe_fresh=False), it does not try the unguarded load first. The
    head never goes backwards, and a deleted account's rows are still refused."""
    a = conns[0]
    did = "did:plc:guardedheads"
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(len(KEYS))]
    sent: list[str] = []

    def log(record: Any) -> None:
        sent.append(record.query)

    a.add_query_logger(log)
    try:
        stats = await _load(a, did, snap, True, guarded=True)
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon, not at once
    finally:
        a.remove_query_logger(log)
    assert (stats.fresh, stats.upserted, stats.typed, stats.heads) == (0, 5, 5, 1)
    upserts = queries.snapshot_upserts_statement(("posts", "likes"))
    assert [q.strip() for q in sent] == ["BEGIN;", fresh.CLAIM.strip(), upserts, "COMMIT;"]
    await check_converged(a, did, snap)
    assert await a.fetchval("SELECT data_cid FROM actors WHERE did = $1", did) == "bafydata"

    older = [write(did, 0, Action.UPDATE, SNAPSHOT_REV - 5)]
    stale = await write_snapshot(a, older, maybe_fresh=False)
    assert (stale.upserted, stale.heads) == (0, 0)
    await check_converged(a, did, snap + older)

    await a.execute("UPDATE actors SET status = 'deleted' WHERE did = $1", did)
    newer = [write(did, 1, Action.UPDATE, SNAPSHOT_REV + 5)]
    refused = await write_snapshot(a, newer, maybe_fresh=False)
    assert (refused.upserted, refused.typed) == (0, 0)
    assert await table_state(a, "records", did) == expected(snap)


@pytest.mark.parametrize("by_copy", [False, True])
async def test_copy_refusal_falls_back_to_the_guarded_path(conns: Any, by_copy: bool) -> None:
    """A row the tables refuse (the same uri in a second batch of a load, which no well-formed MST
    gives) rolls the attempt back; the guarded path writes the batch, inside a caller's
    transaction too."""
    with records_by_copy(by_copy) as sizes:
        await _refused_then_guarded(conns)
    assert bool(sizes) == by_copy


async def _refused_then_guarded(conns: Any) -> None:
    a = conns[0]
    did = "did:plc:freshdup"
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(3)]
    assert (await write_snapshot(a, snap)).fresh == 3
    async with a.transaction():
        again = await write_snapshot(a, snap[1:])
        assert again.fresh == 0 and again.upserted == 0  # identical replays: skipped
    await check_converged(a, did, snap)

    # Outside a transaction the load is one implicit transaction: the refused statement
    # leaves none of its rows (the guarded path then writes the new record, upserted 1) and
    # the connection idle.
    did = "did:plc:freshdup2"
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(4)]
    assert (await write_snapshot(a, snap[:3])).fresh == 3
    rest = await write_snapshot(a, snap[2:])  # uri 2 again, in the load's next batch
    assert (rest.fresh, rest.upserted) == (0, 1)
    assert not a.is_in_transaction()
    await check_converged(a, did, snap)


async def test_races_take_both_paths(conns: Any) -> None:
    """The property above is not vacuous: in every kind of race (each holder, the live batch
    arriving before the load's first or its second batch), some loads are unguarded and some
    refused, and the live delete of a record the load's second batch has always wins."""
    a, b, c = conns
    loaded = refused = 0
    for i in range(12):
        await a.execute(f"TRUNCATE {TABLES}")
        await apply_batch(a, Batch(writes=[write(OTHER, 2, Action.CREATE, 1)]))
        did = f"did:plc:freshboth{i}"
        loads = [
            [write(did, 0, Action.CREATE, SNAPSHOT_REV)],
            [
                write(did, 2, Action.CREATE, SNAPSHOT_REV),
                write(did, 3, Action.CREATE, SNAPSHOT_REV),
            ],
        ]
        live = [write(did, 2, Action.DELETE, SNAPSHOT_REV + 1)]
        race = {
            "did": did, "loads": loads, "live": live,
            "holder": ("live", "load", "mid-live")[i % 3], "at": (i // 3) % 2, "delay_ms": 5,
            "guarded": False,
        }  # fmt: skip
        with records_by_copy(bool(i // 6)):
            n = await asyncio.wait_for(run_race(a, b, c, race), 60)
        loaded += n > 0
        refused += n < 3
        await check_converged(a, did, loads[0] + loads[1] + live)
    assert loaded and refused


async def test_live_batch_and_snapshot_of_a_chained_repo_do_not_deadlock(conns: Any) -> None:
    """Every writer takes a repo's `actors` row before any of its rows. A live batch that met
    the repo before (it holds a chain head) once skipped that claim and reached the row only
    with its heads, after its records; a guarded snapshot batch, which claims first, then
    waited for the live batch's record while holding the row the live batch was about to
    update: PostgreSQL broke the cycle by failing one of them ("deadlock detected"), seen ~4
    times per run of tests/test_e2e_window_live.py, where the failed backfill attempt left
    records of a repo whose retry then failed (its account had gone inactive meanwhile).
    Here the live batch is held after its rows and before its end (`c` holds the other
    repo's like, which it deletes) while the snapshot batch of the same repo runs."""
    a, b, c = conns
    await a.execute(f"TRUNCATE {TABLES}")
    did = "did:plc:chained"
    # The repo's first live commit: a chain head, the repo known to this process.
    await apply_batch(
        a, Batch(writes=[write(did, 0, Action.CREATE, 1), write(OTHER, 2, Action.CREATE, 1)])
    )
    live = [write(did, 1, Action.CREATE, 10)]
    other_like = write(OTHER, 2, Action.DELETE, 2)
    snapshot = [write(did, 0, Action.CREATE, 5), write(did, 1, Action.CREATE, 5)]
    tr = c.transaction()
    await tr.start()
    await c.execute("SELECT 1 FROM records WHERE uri = $1 FOR UPDATE", other_like.uri)
    live_task = asyncio.create_task(apply_batch(a, Batch(writes=[*live, other_like], cursor=2)))
    await wait_for(lambda: waiting(c, a), "the live batch at the other repo's like")
    snapshot_task = asyncio.create_task(write_snapshot(b, snapshot, heads=[(did, tid(5), "bafyd")]))
    await wait_for(lambda: waiting(c, b), "the snapshot batch waiting for the live batch")
    await tr.commit()
    await asyncio.wait_for(asyncio.gather(live_task, snapshot_task), 60)
    await check_converged(a, did, [write(did, 0, Action.CREATE, 1), *live, *snapshot])


# One record of every typed table (and one of no typed table), with the fields they map.
_REF = {"uri": "at://did:plc:bob/app.bsky.feed.post/3k", "cid": "bafyref"}
_EVERY_COLLECTION: list[tuple[str, str, dict[str, Any]]] = [
    ("app.bsky.actor.profile", "self", {"displayName": "Al \u00e9", "description": "d"}),
    ("app.bsky.feed.generator", "gen", {"did": "did:web:f.example", "displayName": "F"}),
    ("app.bsky.feed.like", "3kl", {"subject": _REF}),
    (
        "app.bsky.feed.post",
        "3kp",
        {
            "text": 'tab\there \\ "q" \U0001f98b',
            "langs": ["en", "fr"],
            "reply": {"root": _REF, "parent": _REF},
            "tags": ["x"],
        },
    ),
    ("app.bsky.feed.repost", "3kr", {"subject": _REF}),
    ("app.bsky.graph.block", "3kb", {"subject": "did:plc:bob"}),
    ("app.bsky.graph.follow", "3kf", {"subject": "did:plc:bob"}),
    ("app.bsky.graph.list", "3kli", {"name": "L", "purpose": "app.bsky.graph.defs#modlist"}),
    ("app.bsky.graph.listitem", "3klt", {"list": "at://l", "subject": "did:plc:b"}),
    ("app.bsky.graph.starterpack", "3ks", {"name": "S", "list": "at://l"}),
    ("com.example.note", "n1", {"text": "no typed table"}),
]


# The collections of a snapshot: all of them, and batches whose statements name only some
# typed tables (queries.statement_tables): one everyday table, two, one of the others (which
# names all the others), none.
_SUBSETS = [
    None,
    ("app.bsky.actor.profile",),
    ("app.bsky.feed.like", "app.bsky.feed.post"),
    ("app.bsky.graph.block", "app.bsky.feed.repost"),
    ("com.example.note",),
]


@pytest.mark.parametrize("load", ["statement", "copy", "group"])
@pytest.mark.parametrize("subset", _SUBSETS)
async def test_fresh_load_stores_what_the_guarded_path_stores(
    conns: Any, monkeypatch: pytest.MonkeyPatch, load: str, subset: tuple[str, ...] | None
) -> None:
    """The fresh load (fresh.load_statement: its own INSERTs, no guards, the records rows in
    the statement or by COPY; or several repos' in one statement, together.write_snapshots)
    stores every column of every table as the guarded path writes it, for a record of every
    typed table and one of none, or of some of them; and both as the live stream's
    statement, which names every table, does."""
    a = conns[0]
    fresh_did, guarded_did = "did:plc:" + "f" * 24, "did:plc:" + "g" * 24
    live_did = "did:plc:" + "l" * 24
    chosen = [e for e in _EVERY_COLLECTION if subset is None or e[0] in subset]
    n_typed = sum(c in queries.TYPED_TABLES for c, _, _ in chosen)

    def snapshot(did: str) -> list[RecordWrite]:
        return [
            RecordWrite(
                did,
                c,
                rkey,
                tid(SNAPSHOT_REV),
                Action.CREATE,
                f"bafy{rkey}",
                {"$type": c, "createdAt": "2024-01-01T00:00:00.5+02:00", **record},
            )
            for c, rkey, record in chosen
        ]

    with records_by_copy(load == "copy") as sizes:
        if load == "group":
            head = (fresh_did, tid(SNAPSHOT_REV), None)  # as write_snapshot derives it
            [loaded] = await write_snapshots(a, [prepared_snapshot(snapshot(fresh_did), head)])
        else:
            loaded = await write_snapshot(a, snapshot(fresh_did))
    assert sizes == ([len(chosen)] if load == "copy" else [])
    assert loaded.fresh == len(chosen) and loaded.typed == n_typed
    with monkeypatch.context() as m:
        m.setattr("firehose.storage.snapshots.fresh_candidate", lambda prep: None)
        guarded = await write_snapshot(a, snapshot(guarded_did))
    assert guarded.fresh == 0 and guarded.upserted == len(chosen)
    live = await apply_batch(a, Batch(writes=snapshot(live_did)))
    assert live.upserted == len(chosen) and live.typed == n_typed

    # (table, its key): rows compared in key order, a repo's records being several rows.
    tables = [("records", "uri"), ("actors", "did")]
    tables += [(t.name, "uri") for t in queries.TYPED_TABLES.values()]
    for table, key in tables:
        sql = (
            f"SELECT coalesce(jsonb_agg(to_jsonb(t) - 'indexed_at' - 'updated_at' ORDER BY"
            f" t.{key}), '[]')::text FROM {table} t WHERE did = $1"
        )
        got = await a.fetchval(sql, fresh_did)
        want = await a.fetchval(sql, guarded_did)
        assert got == want.replace(guarded_did, fresh_did), table
        if table != "actors":  # the live stream's head is a chain head (sql/005)
            assert got == (await a.fetchval(sql, live_did)).replace(live_did, fresh_did), table
        typed = [queries.TYPED_TABLES[c].name for c, _, _ in chosen if c in queries.TYPED_TABLES]
        assert (got != "[]") == (table in ("records", "actors", *typed)), table


def test_a_repo_statement_names_the_tables_it_may_need() -> None:
    """queries.statement_tables: the everyday tables a batch has rows for, the others all
    together when it has rows for any of them, in queries.TYPED_ORDER; so few statements."""
    assert queries.statement_tables([]) == ()
    assert queries.statement_tables(["profiles"]) == ("profiles",)
    assert queries.statement_tables(["likes", "posts"]) == ("posts", "likes")
    others = tuple(n for n in queries.TYPED_ORDER if n not in queries.PICKED_TABLES)
    assert queries.statement_tables(["starter_packs"]) == others
    assert queries.statement_tables(["likes", "blocks"]) == tuple(
        n for n in queries.TYPED_ORDER if n == "likes" or n in others
    )
    assert queries.statement_tables(queries.TYPED_ORDER) == queries.TYPED_ORDER
    shapes = {
        queries.statement_tables(c)
        for k in range(len(queries.TYPED_ORDER) + 1)
        for c in itertools.combinations(queries.TYPED_ORDER, k)
    }
    assert len(shapes) == 2 ** (len(queries.PICKED_TABLES) + 1)
    # The statement's parameters follow the tables it names: records, each table, did, rev,
    # data_cid, asynchronous commit (and the xmin when continuing).
    sql = fresh.load_statement(("likes",), continuing=True)
    assert "$7" in sql and "$8" not in sql and "INSERT INTO posts" not in sql
    # The guarded upserts: records, then each table.
    sql = queries.upserts_statement(("likes", "follows"))
    assert "$3" in sql and "$4" not in sql and "INTO posts" not in sql and "INTO follows" in sql
    assert queries.upserts_statement(queries.TYPED_ORDER) == queries.UPSERTS_APPLY


@pytest.mark.parametrize("by_copy", [False, True])
async def test_a_load_cancelled_while_it_waits_is_all_or_nothing(conns: Any, by_copy: bool) -> None:
    """A backfill halted (its task cancelled) while the load's rows wait for a lock, in the
    statement or in the COPY: the connection is usable and the batch is all there or not at
    all. The statement is its own transaction, which may still commit when the server sees
    the cancel request late (after the lock is gone); the COPY's transaction is rolled back
    by the cancelled task. Either way the next attempt converges: fresh again after a
    rollback, guarded (and writing nothing new) after a commit."""
    a, b, c = conns
    await a.execute(f"TRUNCATE {TABLES}")
    did = f"did:plc:freshhalt{int(by_copy)}"
    snap = [write(did, k, Action.CREATE, SNAPSHOT_REV) for k in range(len(KEYS))]
    # `c` holds an uncommitted row of one of the load's uris (no claim: a raw insert), so the
    # load's insert of that uri waits for `c` to end.
    tr = c.transaction()
    await tr.start()
    await c.execute(
        "INSERT INTO records (uri, did, collection, rkey, cid, rev, record)"
        " VALUES ($1, $2, $3, $4, 'bafyc', 'r', '{}')",
        snap[-1].uri, did, snap[-1].collection, snap[-1].rkey,
    )  # fmt: skip
    with records_by_copy(by_copy) as sizes:
        task = asyncio.create_task(_load(b, did, snap, True))
        await wait_for(lambda: waiting(a, b), "the load waiting for the held uri")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tr.rollback()
        assert await b.fetchval("SELECT 1") == 1 and not b.is_in_transaction()
        count = "SELECT count(*) FROM {} WHERE did = $1"
        stored = await a.fetchval(count.format("records"), did)
        assert stored in (0, len(snap))
        assert await a.fetchval(count.format("posts"), did) == (2 if stored else 0)
        if by_copy:
            assert stored == 0
        again = await _load(b, did, snap, True)
    assert again.fresh == (0 if stored else len(snap))
    assert again.upserted == (0 if stored else len(snap))
    assert len(sizes) == (2 if by_copy else 0)
    await check_converged(a, did, snap)
