"""Snapshot writers: a repo's records at one rev, as the backfill and resyncs download them,
written without a cursor (writer.py writes the live stream's batches).

`write_snapshot` writes one batch of one repo: unguarded when the repo is fresh (fresh.py:
never seen by the database, and still ours), else through the rev guards of
`writer.apply_prepared` (together.py writes several small repos' whole snapshots in a few
statements for all). `write_rows` does the same for a batch already turned into rows (the
backfill's, by snapshot_rows.py). `prune_repo` removes what a resync's snapshot no longer has.

Invariants kept (DESIGN.md): a snapshot's rows carry its rev and converge with live writes
in any order (2), its heads advance `actors.rev` but are never chain heads; every writer
takes the repos' `actors` rows first, in did order, then their rows (in uri order, but for a
fresh load, which holds its repo alone: fill_order.py), so writers of one repo wait for each
other and never deadlock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from firehose.model import Batch, RecordWrite
from firehose.storage import fresh, queries
from firehose.storage.copy_text import COPY_COLUMNS, records_copy
from firehose.storage.fill_order import page_filling_order
from firehose.storage.prepare import (
    NO_ROWS,
    ApplyStats,
    PreparedRows,
    RepoHead,
    drain,
    prepare,
    records_json,
    rows_json,
    statement_args,
)
from firehose.storage.writer import apply_prepared

# A fresh batch of at least this many records sends its records rows by COPY (copy_text.py)
# instead of in the load's statement: less of PostgreSQL's CPU per record (-10.5 % in
# bench/backfill.py's pairs), for four round trips more (BEGIN, the COPY's two, COMMIT) than
# the one statement, ~200 µs of our CPU per batch. Where between 128 and ~500 records the
# COPY starts to pay was not resolved on the test machine (docs/performance-log.md, session 18).
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
    stats = ApplyStats()
    rows = prepare(Batch(writes=writes), stats, heads)
    return await write_rows(conn, rows, stats, maybe_fresh=maybe_fresh)


async def write_rows(
    conn: Any,
    rows: PreparedRows,
    stats: ApplyStats,
    *,
    maybe_fresh: bool = True,
    fill: bool = True,
) -> ApplyStats:
    """`write_snapshot` of a batch already turned into rows (`prepare.prepare`, or
    snapshot_rows.py for a snapshot's records), `stats` the counts of that step. `fill=False`:
    a fresh load sends the rows in the order given, which the caller chose across its batches
    (fill_order.chunks_in_filling_order), instead of in two passes of its own."""
    head = fresh_candidate(rows) if maybe_fresh else None
    if head is not None:
        loaded = await _load_fresh(conn, stats, rows, head, fill)
        if loaded is not None:
            return loaded
    prepared = drain(statement_args(Batch(), stats, rows, part_rows=None))
    return await apply_prepared(conn, prepared, chain_heads=False)


# What PostgreSQL raises for a row it refuses, as opposed to a failure of the connection or
# the server: a constraint (a uri twice, which a sane MST never yields), a value it cannot
# store, an index entry over its size limit. The data decides these, so another path or
# another repo's company does not change them: the repo's own write fails, nothing else.
REFUSED: tuple[type[Exception], ...] = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
)

# Per process: the xmin each fresh snapshot's last batch left (see fresh.Loads).
fresh_loads = fresh.Loads()


class _NotFresh(Exception):
    """The repo is not (or no longer) ours to load unguarded: roll the attempt back."""


_NOT_LOADED: tuple[type[Exception], ...] = (_NotFresh, *REFUSED)


def fresh_candidate(prep: PreparedRows) -> RepoHead | None:
    """The head of a batch that may be loaded unguarded: creates of one repo only."""
    if len(prep.heads) != 1 or prep.deletes[0]:
        return None
    return prep.heads[0]


async def _load_fresh(
    conn: Any, stats: ApplyStats, prep: PreparedRows, head: RepoHead, fill: bool
) -> ApplyStats | None:
    """Insert the batch unguarded if its repo is fresh and ours (fresh.py): the stats, else
    None (nothing written; the caller takes the guarded path)."""
    did, rev, data_cid = head
    key = (did, rev)
    known, xmin = fresh_loads.get(key)
    if known and xmin is None:
        return None
    copy, records, tables, typed = fresh_payload(prep, continuing=xmin is not None, fill=fill)
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
    except _NOT_LOADED:
        # Not fresh, or a row the table refuses (a uri twice, which a well-formed MST never
        # yields): the guarded path decides, row by row.
        fresh_loads.put(key, None)
        return None
    fresh_loads.put(key, row["xmin"])
    out = replace(stats)
    out.upserted += inserted
    out.fresh += inserted
    out.typed += row["typed"]
    out.heads += 1
    return out


def fresh_payload(
    prep: PreparedRows, *, continuing: bool, fill: bool = True
) -> tuple[bytes | None, bytes, tuple[str, ...], list[bytes]]:
    """What a fresh load of `prep` sends (pure): the COPY text of its records rows (None: a
    small batch, whose records rows go as the JSON parameter instead), that parameter, the
    typed tables its statement names and each one's JSON rows. A first batch's statement
    names only the typed tables it may need; a continuing one names every table. With
    `fill`, each table's rows go in fill_order.py's order: the load holds the repo, and its
    key ranges then end in index pages ~90 % full instead of half full."""
    order = page_filling_order if fill else _as_given
    rows = order(prep.records)
    copy = _records_copy(rows)
    records = records_json(rows) if rows and copy is None else NO_ROWS
    tables = queries.TYPED_ORDER if continuing else queries.statement_tables(prep.typed)
    typed = [rows_json(order(prep.typed[n])) if n in prep.typed else NO_ROWS for n in tables]
    return copy, records, tables, typed


def _as_given(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return rows


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
