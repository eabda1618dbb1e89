"""Small repos' whole snapshots written together: a few statements for all of them.

For a small repo the statements cost more than its rows (docs/performance-log.md, session 23).
`prepare_snapshot` (pure, run by each repo's own task, so the work stays spread over the
event loop's turns as before) turns one repo's whole snapshot into rows and JSON;
`write_snapshots` then writes several of them as `snapshots.write_snapshot` would write
each: the fresh ones in one unguarded load (fresh.group_statement), the others, and any the
load finds not fresh, in one guarded transaction (writer.apply_prepared).

Invariants kept: the same as one snapshot's (snapshots.py): each repo is claimed as a
single load or a single guarded batch claims it, every writer takes the repos' `actors`
rows first, in did order, and a repo the load does not make ours is written guarded. The
guarded transaction's rows go repo after repo in did order, each repo's in uri order: two
writers of one repo never hold its rows at once (the `actors` row comes first), so this
order is enough to never deadlock. A row PostgreSQL refuses sends each repo of that
statement alone through `snapshots.write_rows`, so that it fails only its own repo:
each repo gets its own outcome, its stats or the error of its own write, never another
repo's (a hostile repo must not cost the repos it shares a statement with an attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from firehose.model import Batch
from firehose.storage import fresh, queries, snapshots
from firehose.storage.prepare import (
    NO_ROWS,
    ApplyStats,
    PreparedBatch,
    PreparedRows,
    RepoHead,
    latest_heads,
    records_json,
    rows_json,
)
from firehose.storage.writer import apply_prepared


@dataclass(slots=True)
class PreparedSnapshot:
    """A repo's whole snapshot (one batch with its head) as rows and JSON."""

    head: RepoHead
    maybe_fresh: bool  # as write_snapshot's: False when the repo is known to have a head
    stats: ApplyStats  # the counts of its own batch (writes, duplicates, invalid, sanitized)
    rows: PreparedRows
    records: bytes  # the records rows (queries.rows_param)
    typed: dict[str, bytes]  # table -> its rows


def prepare_snapshot(
    rows: PreparedRows, stats: ApplyStats, head: RepoHead, maybe_fresh: bool = True
) -> PreparedSnapshot:
    """The pure half of `write_snapshots` for one repo: its whole snapshot as rows with the
    head `head` (snapshot_rows.py or `prepare.prepare`), `stats` the counts of that step."""
    return PreparedSnapshot(
        head=head,
        maybe_fresh=maybe_fresh,
        stats=stats,
        rows=rows,
        records=records_json(rows.records) if rows.records else NO_ROWS,
        typed={name: rows_json(r) for name, r in rows.typed.items()},
    )


async def write_snapshots(
    conn: Any, prepared: Sequence[PreparedSnapshot]
) -> list[ApplyStats | Exception]:
    """Write the snapshots as `snapshots.write_snapshot` writes each, in a few statements.

    Per snapshot its outcome: its stats (the counts of its own batch and, when it was loaded
    unguarded, its rows; the rows the guarded transaction wrote are counted in the stats of
    the first snapshot it wrote, so that the list sums to what was written), or the error
    that its own write raised: a row PostgreSQL refused when the repo was written alone, or
    the failure of a statement that carried it (a lost connection fails every repo of that
    statement, and only those)."""
    stats = [replace(s.stats) for s in prepared]
    errors: dict[int, Exception] = {}  # the repos whose write failed, by index
    dids: set[str] = set()
    alone: list[int] = []  # a second snapshot of one repo
    loads: list[int] = []
    guarded: list[int] = []
    for i, s in enumerate(prepared):
        did, rev, _ = s.head
        if did in dids:
            alone.append(i)
            continue
        dids.add(did)
        loadable = s.maybe_fresh and snapshots.fresh_candidate(s.rows) is not None
        known = snapshots.fresh_loads.get((did, rev))[0]
        (loads if loadable and not known else guarded).append(i)
    if loads:
        try:
            xmins = await _load(conn, [prepared[i] for i in loads])
        except Exception as exc:  # the statement failed (a lost connection): its repos
            xmins = []
            errors.update(dict.fromkeys(loads, exc))
        if xmins is None:
            alone += loads  # refused: each tries its own load
        for i, xmin in zip(loads, xmins or (), strict=False):
            if xmin is None:
                guarded.append(i)
                continue
            rows = prepared[i].rows
            stats[i].upserted += len(rows.records)
            stats[i].fresh += len(rows.records)
            stats[i].typed += sum(len(r) for r in rows.typed.values())
            stats[i].heads += 1
    if guarded:
        guarded.sort(key=lambda i: prepared[i].head[0])
        batch = _merged([prepared[i] for i in guarded])
        try:
            written = await apply_prepared(conn, batch, chain_heads=False)
        except snapshots.REFUSED as exc:
            if len(guarded) == 1:
                errors[guarded[0]] = exc  # refused, alone already: its own error
            else:
                alone += guarded
        except Exception as exc:
            errors.update(dict.fromkeys(guarded, exc))
        else:
            stats[guarded[0]].add(written)
    for i in sorted(alone):
        s = prepared[i]
        try:
            stats[i] = await snapshots.write_rows(conn, s.rows, s.stats, maybe_fresh=s.maybe_fresh)
        except Exception as exc:
            errors[i] = exc
    return [errors.get(i, s) for i, s in enumerate(stats)]


async def _load(conn: Any, members: list[PreparedSnapshot]) -> list[str | None] | None:
    """Load the fresh ones of `members` (one repo each) unguarded in one statement: per
    member the xmin its claim left, None when not fresh (nothing of it written); None when
    a row was refused (nothing written at all)."""
    typed: dict[str, list[bytes]] = {}
    for s in members:
        for name, part in s.typed.items():
            typed.setdefault(name, []).append(part)
    tables = queries.statement_tables(typed)
    args = [
        _joined([s.records for s in members]),
        *(_joined(typed.get(name, [])) for name in tables),
        rows_json([s.head for s in members]),
        not conn.is_in_transaction(),
    ]
    try:
        row = await conn.fetchrow(fresh.group_statement(tables), *args)
    except snapshots.REFUSED:
        return None
    claimed = dict(zip(row["dids"], row["xmins"], strict=True))
    xmins = [claimed.get(s.head[0]) for s in members]
    for s, xmin in zip(members, xmins, strict=True):
        snapshots.fresh_loads.put((s.head[0], s.head[1]), xmin)
    return xmins


def _merged(members: list[PreparedSnapshot]) -> PreparedBatch:
    """One guarded batch of the members' rows, repo after repo (in the caller's order)."""
    typed: dict[str, list[bytes]] = {}
    for s in members:
        for name, part in s.typed.items():
            typed.setdefault(name, []).append(part)
    rows = [s.rows for s in members]
    heads = latest_heads(h for r in rows for h in r.heads)
    typed_rows: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        for name, table_rows in r.typed.items():
            typed_rows.setdefault(name, []).extend(table_rows)
    merged = PreparedRows(
        records=[row for r in rows for row in r.records],
        typed=typed_rows,
        deletes=(
            [x for r in rows for x in r.deletes[0]],
            [x for r in rows for x in r.deletes[1]],
            [x for r in rows for x in r.deletes[2]],
            [x for r in rows for x in r.deletes[3]],
        ),
        heads=heads,
        claims=sorted({did for r in rows for did in r.claims}),
    )
    records = _joined([s.records for s in members])
    return PreparedBatch(
        batch=Batch(),
        stats=ApplyStats(),
        rows=merged,
        identities=[],
        accounts=[],
        records=None if records == NO_ROWS else records,
        typed=[(name, _joined(parts)) for name, parts in typed.items()],
        resyncs=[],
        heads_json=rows_json(heads),
        identities_json=NO_ROWS,
        accounts_json=NO_ROWS,
    )


def _joined(parts: list[bytes]) -> bytes:
    """JSON arrays of rows (queries.rows_param) as one."""
    kept = [p[1:-1] for p in parts if p != NO_ROWS]
    return b"[" + b",".join(kept) + b"]" if kept else NO_ROWS
