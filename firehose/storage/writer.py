"""apply_batch(): one batch of firehose (or backfill) work in ONE transaction.

Steps, all inside one transaction so that the cursor never runs ahead of the data
(DESIGN.md invariant 1):

1. account (`#account`) and identity (`#identity`) events, last one per did in seq order;
   accounts whose status became `deleted` lose their rows in records and every typed table;
2. record writes, deduplicated per uri keeping the highest rev (ties: the later write);
   creates/updates are sent as one JSON parameter per table and upserted set-wise with
   the rev guards of invariant 2 (see queries.py); deletes leave a tombstone (uri, rev)
   and remove rows whose rev is not newer than the delete;
3. per repo, the latest commit rev (and data cid when known) in `actors`, never backwards;
4. the cursor row of `service`, when the batch carries a cursor, and the resync requests of
   the gate (`batch.resyncs`), so that a request is saved exactly with the cursor that passes
   the event which caused it.

0. before any row: the claim of the repos written (its own statement, see fresh.py), which
   keeps a fresh repo's unguarded load (`write_snapshot`) and every other writer apart.

Round trips per batch: BEGIN, the claim when the batch writes records, one per actor
step present (identities, accounts, purge),
one for every create/update (records and all typed tables), one for all deletes, one for
the repo heads + cursor + resync requests (a snapshot writer's batch without deletes sends
its heads with the creates/updates), COMMIT. The pure half (firehose.storage.prepare:
the deduplication, the rows and the statements' parameters) is apart from the transaction
(`apply_prepared`) so that the worker can overlap them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from firehose.model import Batch
from firehose.storage import fresh, queries
from firehose.storage.prepare import (
    NO_ROWS,
    ApplyStats,
    PreparedBatch,
    RepoHead,
    prepare_batch,
)

# Asynchronous commit: COMMIT returns before its WAL is flushed (one fsync less per batch).
# Safe for invariant 1 because the rows and the cursor are in the SAME transaction and the
# WAL is one sequential log: a crash of the PostgreSQL server (a crash of the worker changes
# nothing) can only lose a suffix of the most recent transactions, each with its rows AND its
# cursor, never rows without their cursor or a cursor without its rows. On restart the
# worker reads the older cursor that survived and the relay replays the lost events, which
# the rev guards make idempotent. A later synchronous commit (of any session) flushes the
# earlier WAL too, so what a caller saw durably committed stays so.
# Set by queries.BATCH_HEADS, the statement with the cursor (no round trip of its own).
_ASYNC_COMMIT = "synchronous_commit = off"


async def apply_batch(
    conn: Any,
    batch: Batch,
    *,
    service: str = "firehose",
    heads: Sequence[RepoHead] | None = None,
    chain_heads: bool = True,
) -> ApplyStats:
    """Apply `batch` in one transaction; save `batch.cursor` under `service` if not None.

    `heads` gives each repo's latest commit (did, rev, data_cid); by default the highest
    write rev per did, without data cid. Backfill snapshots use this with `cursor=None`
    (see `write_snapshot`). `chain_heads`: the heads are also points of the repos' chains,
    which the sync 1.1 checks compare with (sql/005_chain_heads.sql): true for the live
    stream only, false for snapshots.
    """
    prepared = prepare_batch(batch, heads)
    return await apply_prepared(conn, prepared, service=service, chain_heads=chain_heads)


async def apply_prepared(
    conn: Any,
    prepared: PreparedBatch,
    *,
    service: str = "firehose",
    chain_heads: bool = True,
    rows_sent: asyncio.Event | None = None,
) -> ApplyStats:
    """The database half of `apply_batch`: one transaction (see the module docstring).

    `rows_sent` is set as the statements that write the batch's rows (the long ones) are
    sent: a caller with CPU work to do on the same event loop waits for it, so that the short
    round trips before them (the claim, heads, accounts) are not held up by that work."""
    batch, prep = prepared.batch, prepared.rows
    stats = replace(prepared.stats)  # a copy: a retried transaction must not count twice
    identities, accounts = prepared.identities, prepared.accounts
    nested = conn.is_in_transaction()

    # Inside a caller's transaction (nested), durability is the caller's.
    async with conn.transaction():
        # 0. Every writer takes the `actors` rows of the repos it writes, in did order, before
        #    any of their rows: two writers of one repo (a live batch and a backfill or resync
        #    batch) then wait for each other at that row and never deadlock on the rows
        #    behind it. It also waits for (and ends) a fresh load of one of them under way, so
        #    that the statements below see its rows (firehose/storage/fresh.py). The live
        #    stream takes the rows with its heads and cursor, which also claim (they write
        #    every row no live commit has touched yet); snapshot writers claim (fresh.CLAIM),
        #    since a head that is not newer leaves a loader's row as it is.
        resyncs = prepared.resyncs

        async def finish(heads: bytes, cursor: bool, requests: Sequence[tuple[str, str]]) -> None:
            """queries.BATCH_HEADS: the `heads` JSON (chain heads for the live stream); with
            `cursor` the batch's cursor and, unless a caller's transaction is around us, the
            asynchronous COMMIT (see _ASYNC_COMMIT); the gate's resync `requests`."""
            row = await conn.fetchrow(
                queries.BATCH_HEADS,
                heads,
                service,
                batch.cursor if cursor else None,
                batch.last_event_time,
                cursor and not nested,
                [r[0] for r in requests],
                [r[1] for r in requests],
                chain_heads,
            )
            stats.heads += row["heads"]
            stats.resyncs += row["resyncs"]

        if not chain_heads:
            if prep.claims:
                await conn.execute(fresh.CLAIM, prep.claims)
        elif prep.heads or batch.cursor is not None or not nested:
            await finish(prepared.heads_json, True, ())
        # 1. Accounts first, so that writes of a deleted account in this very batch are refused
        #    by the actor guard, and writes after a reactivation are accepted.
        if identities:
            await conn.execute(queries.ACTOR_IDENTITIES, prepared.identities_json)
        if accounts:
            await conn.execute(queries.ACTOR_ACCOUNTS, prepared.accounts_json)
            dead = [e.did for e in accounts if e.effective_status == "deleted"]
            if dead:
                stats.purged += await purge_accounts(conn, dead)

        if rows_sent is not None:
            rows_sent.set()  # the statement below goes out before the waiter runs
        # 2. Creates/updates: the guarded upserts of records and the typed tables, records
        #    first, in one statement. A snapshot writer's batch (one repo, often small) names
        #    only the typed tables it needs (queries.statement_tables), and without deletes
        #    carries its heads too (queries.snapshot_upserts_statement); the live stream's,
        #    of many repos, names all of them.
        upserts = prepared.records is not None or bool(prepared.typed)
        heads_done = (
            upserts
            and not chain_heads
            and not prep.deletes[0]
            and batch.cursor is None
            and not resyncs
        )
        if upserts:
            typed = dict(prepared.typed)
            tables = queries.TYPED_ORDER if chain_heads else queries.statement_tables(typed)
            args: list[Any] = [
                prepared.records or NO_ROWS,
                *[typed.get(name, NO_ROWS) for name in tables],
            ]
            if heads_done:
                sql = queries.snapshot_upserts_statement(tables)
                args += [prepared.heads_json, not nested]
            else:
                sql = queries.upserts_statement(tables)
            row = await conn.fetchrow(sql, *args)
            stats.upserted += row["upserted"]
            stats.skipped += len(prep.records) - row["upserted"]
            stats.typed += row["typed"]
            if heads_done:
                stats.heads += row["heads"]

        # 3. Deletes: tombstones + guarded deletes, one statement.
        if prep.deletes[0]:
            row = await conn.fetchrow(queries.DELETES_APPLY, *prep.deletes)
            stats.tombstones += row["tombstones"]
            stats.deleted += row["deleted"]

        # 4. Snapshot writers: the repo heads (never backwards) and the cursor if any. The
        #    live stream: its gate's resync requests, in the transaction of the cursor that
        #    passes the events that caused them.
        if chain_heads:
            if resyncs:
                await finish(NO_ROWS, False, resyncs)
        elif not heads_done and (prep.heads or batch.cursor is not None or resyncs or not nested):
            await finish(prepared.heads_json, True, resyncs)
    return stats


async def purge_accounts(conn: Any, dids: Sequence[str]) -> int:
    """Remove every row of the deleted accounts `dids` (records and typed tables), one
    account at a time, each read through the primary key (see queries.CUSTOM_PLANS). The
    number of records rows removed. In the caller's transaction, if any."""
    purged = 0
    async with conn.transaction():
        previous = await conn.fetchval(queries.CUSTOM_PLANS)
        for did in dids:
            purged += await conn.fetchval(queries.ACTOR_PURGE, did)
        # The caller's next statements in this transaction are planned as before (see
        # queries.RESTORE_PLANS).
        await conn.execute(queries.RESTORE_PLANS, previous)
    return purged


async def load_cursor(conn: Any, service: str) -> int | None:
    """The saved cursor of `service`, or None if there is none."""
    value = await conn.fetchval(queries.CURSOR_LOAD, service)
    return int(value) if value is not None else None


async def load_min_cursor_of_other_shards(conn: Any, service: str) -> int | None:
    """The lowest saved live cursor among the shards other than `service`, or None."""
    value = await conn.fetchval(queries.CURSOR_MIN_OF_OTHER_SHARDS, service)
    return int(value) if value is not None else None


async def save_cursor(
    conn: Any, service: str, cursor: int | None, last_event_time: datetime | None = None
) -> None:
    """Upsert the cursor row of `service` (a NULL last_event_time keeps the stored one)."""
    await conn.execute(queries.CURSOR_SAVE, service, cursor, last_event_time)
