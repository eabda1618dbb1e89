"""Snapshot writers: a repo's records at one rev, as the backfill and resyncs download them,
written without a cursor (writer.py writes the live stream's batches).

`write_snapshot` writes one batch of one repo: unguarded when the repo is fresh (fresh.py:
never seen by the database, and still ours), else through the rev guards of
`writer.apply_prepared`. `write_snapshots` writes several small repos' whole snapshots in a
few statements for all: the fresh ones in one load, the others in one guarded transaction.
`prune_repo` removes what a resync's snapshot no longer has.

Invariants kept (DESIGN.md): a snapshot's rows carry its rev and converge with live writes
in any order (2), its heads advance `actors.rev` but are never chain heads; every writer
takes the repos' `actors` rows first, in did order, then their rows in uri order, so
writers of one repo wait for each other and never deadlock.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from firehose.model import Batch, RecordWrite
from firehose.storage import fresh, queries
from firehose.storage.copy_text import COPY_COLUMNS, records_copy
from firehose.storage.writer import (
    NO_ROWS,
    ApplyStats,
    PreparedRows,
    RepoHead,
    apply_prepared,
    drain,
    latest_heads,
    prepare,
    records_json,
    rows_json,
    statement_args,
)

# A fresh batch of at least this many records sends its records rows by COPY (copy_text.py)
# instead of in the load's statement: less of PostgreSQL's CPU per record (-10.5 % in
# bench/backfill.py's pairs), for four round trips more (BEGIN, the COPY's two, COMMIT) than
# the one statement, ~200 µs of our CPU per batch. Where between 128 and ~500 records the
# COPY starts to pay was not resolved on the test machine (docs/performance.md, session 18).
FRESH_COPY_MIN_RECORDS = 128


async def write_snapshot(
    conn: Any,
    writes: list[RecordWrite],
    *,
    heads: Sequence[RepoHead] | None = None,
    maybe_fresh: bool = True,
) -> ApplyStats:
    """Backfill and resync: write snapshot records (rev = the snapshot's rev) without touching
    a cursor.

    The rev guards make this safe against live events in any order (invariant 2). Its heads
    advance `actors.rev` but are never chain heads (sql/005_chain_heads.sql): live commits
    older than the snapshot may still arrive and must be applied, which a chain head at the
    snapshot's rev would drop as rev_not_newer after a restart. Even a resync, which removes
    what its snapshot no longer has, cannot tombstone a record created afterwards by such an
    older commit; that record goes only when the stream's own delete is applied.

    A batch of one repo the database has never seen (or the next batch of such a snapshot,
    nobody else having written the repo since) is inserted without the guards, which could
    only say yes (firehose/storage/fresh.py); any other batch takes the guarded path.
    `maybe_fresh=False`: the caller knows the repo has a head already (the backfill's claim,
    backfill.queue.Claimed.headed), so the batch takes the guarded path without first trying
    the unguarded load, which would only find the repo not fresh.
    """
    batch = Batch(writes=writes)
    stats = ApplyStats()
    rows = prepare(batch, stats, heads)
    head = _fresh_candidate(rows) if maybe_fresh else None
    if head is not None:
        loaded = await _load_fresh(conn, stats, rows, head)
        if loaded is not None:
            return loaded
    prepared = drain(statement_args(batch, stats, rows, part_rows=None))
    return await apply_prepared(conn, prepared, chain_heads=False)


# Per process: the xmin each fresh snapshot's last batch left (see fresh.Loads).
_fresh_loads = fresh.Loads()


class _NotFresh(Exception):
    """The repo is not (or no longer) ours to load unguarded: roll the attempt back."""


def _fresh_candidate(prep: PreparedRows) -> RepoHead | None:
    """The head of a batch that may be loaded unguarded: creates of one repo only."""
    if len(prep.heads) != 1 or prep.deletes[0]:
        return None
    return prep.heads[0]


async def _load_fresh(
    conn: Any, stats: ApplyStats, prep: PreparedRows, head: RepoHead
) -> ApplyStats | None:
    """Insert the batch unguarded if its repo is fresh and ours (fresh.py): the stats, else
    None (nothing written; the caller takes the guarded path)."""
    did, rev, data_cid = head
    key = (did, rev)
    known, xmin = _fresh_loads.get(key)
    if known and xmin is None:
        return None
    copy = _records_copy(prep.records)
    records = records_json(prep.records) if prep.records and copy is None else NO_ROWS
    # A first batch's statement names only the typed tables it may need.
    tables = queries.TYPED_ORDER if xmin is not None else queries.statement_tables(prep.typed)
    typed = [rows_json(prep.typed[n]) if n in prep.typed else NO_ROWS for n in tables]
    nested = conn.is_in_transaction()
    sql = fresh.load_statement(tables, continuing=xmin is not None)
    args = [records, *typed, did, rev, data_cid, not nested]
    if xmin is not None:
        args.append(xmin)
    # Inside a caller's transaction the load is a savepoint, so a refusal rolls back only it.
    # Otherwise, without a COPY, it is ONE statement, hence its own implicit transaction: all
    # of it commits or none (a refused row rolls it back), without the two round trips of
    # BEGIN and COMMIT (for repos of ~100 records, loaded in one batch each, those were half
    # of the backfill's statements). Its set_config(..., true) still makes that commit
    # asynchronous: a local setting lasts until the transaction ends (measured: ~190 against
    # ~300 µs per one-row statement with fsync on). A claim that finds the repo not ours
    # writes nothing: every insert of the statement is conditioned on the claim (fresh.py),
    # and the COPY of the records rows is sent only after it, in the same transaction.
    own = nested or copy is not None
    try:
        async with conn.transaction() if own else contextlib.nullcontext():
            row = await conn.fetchrow(sql, *args)
            if row["xmin"] is None:
                raise _NotFresh
            inserted = row["inserted"]
            if copy is not None:
                # A memoryview: asyncpg sends a buffer as it is (bytes it would take for a
                # path, a file object it would read on a thread).
                status = await conn.copy_to_table(
                    "records", source=memoryview(copy), columns=COPY_COLUMNS, format="text"
                )
                inserted = int(status.rpartition(" ")[2])
    except (_NotFresh, asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
        # Not fresh, or a row the table refuses (a uri twice, which a well-formed MST never
        # yields): the guarded path decides, row by row.
        _fresh_loads.put(key, None)
        return None
    _fresh_loads.put(key, row["xmin"])
    out = replace(stats)
    out.upserted += inserted
    out.fresh += inserted
    out.typed += row["typed"]
    out.heads += 1
    return out


# A repo's whole snapshot in one batch, for write_snapshots: its writes, its head, and
# whether it may be fresh (write_snapshot's maybe_fresh).
WholeSnapshot = tuple[list[RecordWrite], RepoHead, bool]


async def write_snapshots(conn: Any, snapshots: Sequence[WholeSnapshot]) -> list[ApplyStats]:
    """Several repos' whole snapshots (each one batch with its head), written as
    `write_snapshot` writes each, in a few statements for all: the fresh ones loaded together
    (fresh.group_statement), the others in one guarded transaction. For a small repo those
    statements cost more than its rows (docs/performance.md, session 23).

    Per snapshot its stats: the counts of its own batch (writes, duplicates, invalid,
    sanitized) and, when it was loaded unguarded, its rows; the rows the guarded transaction
    wrote are counted in the stats of the first snapshot it wrote, so that the list sums to
    what was written. A row PostgreSQL refuses sends each snapshot of that statement alone
    through `write_snapshot`, so that it fails only its own repo."""
    stats = [ApplyStats() for _ in snapshots]
    preps = [
        prepare(Batch(writes=writes), s, [head])
        for (writes, head, _), s in zip(snapshots, stats, strict=True)
    ]
    dids: set[str] = set()
    alone: list[int] = []  # a second snapshot of one repo
    fresh_ones: list[int] = []
    guarded: list[int] = []
    for i, (_, (did, rev, _), maybe_fresh) in enumerate(snapshots):
        if did in dids:
            alone.append(i)
            continue
        dids.add(did)
        loadable = maybe_fresh and _fresh_candidate(preps[i]) is not None
        (fresh_ones if loadable and not _fresh_loads.get((did, rev))[0] else guarded).append(i)
    if fresh_ones:
        xmins = await _load_together(conn, [(snapshots[i][1], preps[i]) for i in fresh_ones])
        if xmins is None:
            alone += fresh_ones  # refused: each tries its own load
        for i, xmin in zip(fresh_ones, xmins or (), strict=False):
            if xmin is None:
                guarded.append(i)
                continue
            loaded = len(preps[i].records)
            stats[i].upserted += loaded
            stats[i].fresh += loaded
            stats[i].typed += sum(len(rows) for rows in preps[i].typed.values())
            stats[i].heads += 1
    if guarded:
        guarded.sort()
        batch = drain(
            statement_args(Batch(), ApplyStats(), _merged([preps[i] for i in guarded]), None)
        )
        try:
            stats[guarded[0]].add(await apply_prepared(conn, batch, chain_heads=False))
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
            if len(guarded) == 1:
                raise
            alone += guarded
    for i in sorted(alone):
        writes, head, maybe_fresh = snapshots[i]
        stats[i] = await write_snapshot(conn, writes, heads=[head], maybe_fresh=maybe_fresh)
    return stats


async def _load_together(
    conn: Any, members: list[tuple[RepoHead, PreparedRows]]
) -> list[str | None] | None:
    """Load the fresh ones of `members` (one repo each) unguarded in one statement: per
    member the xmin its claim left, None when not fresh (nothing of it written); None when
    a row was refused (nothing written at all)."""
    records = [row for _, prep in members for row in prep.records]
    typed: dict[str, list[tuple[Any, ...]]] = {}
    for _, prep in members:
        for name, rows in prep.typed.items():
            typed.setdefault(name, []).extend(rows)
    tables = queries.statement_tables(typed)
    args = [
        records_json(records) if records else NO_ROWS,
        *(rows_json(typed[n]) if n in typed else NO_ROWS for n in tables),
        rows_json([head for head, _ in members]),
        not conn.is_in_transaction(),
    ]
    try:
        row = await conn.fetchrow(fresh.group_statement(tables), *args)
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
        return None
    claimed = dict(zip(row["dids"], row["xmins"], strict=True))
    xmins = [claimed.get(head[0]) for head, _ in members]
    for (head, _), xmin in zip(members, xmins, strict=True):
        _fresh_loads.put((head[0], head[1]), xmin)
    return xmins


def _merged(preps: list[PreparedRows]) -> PreparedRows:
    """The rows of several repos' batches as one batch's, each kind in uri order (the order
    in which every writer locks rows, see _prepare_steps)."""
    if len(preps) == 1:
        return preps[0]
    by_uri = operator.itemgetter(0)
    typed: dict[str, list[tuple[Any, ...]]] = {}
    for p in preps:
        for name, rows in p.typed.items():
            typed.setdefault(name, []).extend(rows)
    gone = sorted(row for p in preps for row in zip(*p.deletes, strict=True))
    deletes = (
        [d[0] for d in gone],
        [d[1] for d in gone],
        [d[2] for d in gone],
        [d[3] for d in gone],
    )
    return PreparedRows(
        records=sorted((row for p in preps for row in p.records), key=by_uri),
        typed={name: sorted(rows, key=by_uri) for name, rows in typed.items()},
        deletes=deletes,
        heads=latest_heads(h for p in preps for h in p.heads),
        claims=sorted({did for p in preps for did in p.claims}),
    )


def _records_copy(rows: list[tuple[Any, ...]]) -> bytes | None:
    """The COPY text of a fresh batch's records rows (copy_text.py), or None: a batch below
    FRESH_COPY_MIN_RECORDS, or a value the COPY text cannot hold."""
    if len(rows) < FRESH_COPY_MIN_RECORDS:
        return None
    try:
        return records_copy(rows)
    except ValueError:  # UnicodeEncodeError (a lone surrogate) included
        return None


async def prune_repo(conn: Any, did: str, rev: str) -> int:
    """After every record of `did`'s snapshot at `rev` was written (`write_snapshot`): remove
    the repo's rows the snapshot no longer has, tombstoned at `rev` (see queries.REPO_PRUNE).
    The number of records rows removed."""
    async with conn.transaction():
        await conn.execute(queries.CUSTOM_PLANS)
        row = await conn.fetchrow(queries.REPO_PRUNE, did, rev)
    return int(row["removed"])
