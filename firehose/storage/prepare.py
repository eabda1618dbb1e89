"""The pure half of a batch's transaction: a batch -> rows and statement arguments (no I/O).

`prepare_batch` (or `prepare_steps`, the same in slices for the worker's event loop) turns a
`Batch` into a `PreparedBatch`: record writes deduplicated per uri keeping the highest rev
(ties: the later write), unstorable ones counted and skipped, rows in uri order (the lock
order of every statement, so concurrent writers cannot deadlock), each repo's head, the
accounts' and identities' last event per did, and the JSON parameters of the statements.
firehose.storage.writer sends them in one transaction (`apply_prepared`); keeping this half
apart lets the worker prepare batch N+1 while batch N's transaction runs.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import orjson

from firehose.model import Action, Batch, RecordWrite
from firehose.storage.rows import RECORD_COLUMN, record_json, rows_of, storable_ids

# Writes turned into rows (or JSON) between two suspensions of `prepare_steps`: about 0.2 ms
# of work (rows_of and the JSON cost 3-6 µs per write).
PREPARE_STEP_WRITES = 64
_T = TypeVar("_T")
_DELETE = Action.DELETE  # a module global: an enum member's lookup on its class costs more

# (did, rev, data_cid): the head of a repo after a commit. data_cid is the commit's MST root
# when the caller knows it, else None.
RepoHead = tuple[str, str, str | None]


@dataclass(slots=True)
class ApplyStats:
    writes: int = 0  # record writes in the batch
    duplicates: int = 0  # dropped by the per-uri dedupe (an older rev of the same uri)
    invalid: int = 0  # unstorable writes skipped (no record, oversized/NUL uri, ...)
    upserted: int = 0  # records rows inserted or updated
    typed: int = 0  # typed-table rows inserted or updated
    skipped: int = 0  # creates/updates refused by a guard (older rev, tombstone, deleted
    #                   account) or identical replays
    deleted: int = 0  # records rows removed by delete ops
    tombstones: int = 0  # tombstones written or advanced
    purged: int = 0  # records rows removed because their account was deleted
    heads: int = 0  # actors whose latest commit rev advanced
    sanitized: int = 0  # creates/updates staged whose record had NUL replaced (decoder flag)
    resyncs: int = 0  # repos queued (or re-armed) for a resync
    fresh: int = 0  # of `upserted`: records rows inserted unguarded into a fresh repo (fresh.py)

    def add(self, other: ApplyStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def heads_from_writes(writes: Iterable[RecordWrite]) -> list[RepoHead]:
    """Per did, the highest rev among the writes (data cid unknown)."""
    best: dict[str, str] = {}
    for w in writes:
        rev = best.get(w.did)
        if rev is None or rev < w.rev:
            best[w.did] = w.rev
    return [(did, best[did], None) for did in sorted(best)]


def latest_heads(heads: Iterable[RepoHead]) -> list[RepoHead]:
    """One head per did (the highest rev; ties: the later one), in did order."""
    best: dict[str, RepoHead] = {}
    for h in heads:
        seen = best.get(h[0])
        if seen is None or seen[1] <= h[1]:
            best[h[0]] = h
    return [best[did] for did in sorted(best)]


@dataclass(slots=True)
class PreparedRows:
    """The batch turned into rows (pure work done before the transaction starts)."""

    records: list[tuple[Any, ...]]
    typed: dict[str, list[tuple[Any, ...]]]
    deletes: tuple[list[str], list[str], list[str], list[str]]
    heads: list[RepoHead]
    # The repos whose rows the batch writes, in did order: claimed before any row is
    # written (firehose/storage/fresh.py).
    claims: list[str]


def applied_writes(writes: Sequence[RecordWrite]) -> dict[str, RecordWrite]:
    """uri -> the write the writer applies: of the storable writes (rows.py), the one with the
    highest rev per uri (ties: the later one in the list). firehose.storage.refusals probes
    exactly these."""
    return drain(_applied_writes_steps(writes, ApplyStats()))


def _applied_writes_steps(
    writes: Sequence[RecordWrite], stats: ApplyStats
) -> Generator[None, None, dict[str, RecordWrite]]:
    """`applied_writes`, suspended every PREPARE_STEP_WRITES writes, counting the writes,
    the unstorable ones and the superseded ones in `stats`."""
    stats.writes += len(writes)
    latest: dict[str, RecordWrite] = {}
    seen_write = latest.get
    valid = 0
    for n, w in enumerate(writes, 1):
        uri = w.uri
        if storable_ids(uri, w.rev, w.cid):
            valid += 1
            # The highest rev per uri (ties: the later write), inline: every write passes here.
            seen = seen_write(uri)
            if seen is None or seen.rev <= w.rev:
                latest[uri] = w
        if not n % PREPARE_STEP_WRITES:
            yield
    stats.invalid += len(writes) - valid
    stats.duplicates += valid - len(latest)
    return latest


def prepare(
    batch: Batch, stats: ApplyStats, heads: Sequence[RepoHead] | None = None
) -> PreparedRows:
    return drain(_prepare_steps(batch, stats, heads))


def _prepare_steps(
    batch: Batch, stats: ApplyStats, heads: Sequence[RepoHead] | None
) -> Generator[None, None, PreparedRows]:
    """`prepare`, suspended (a bare yield) every PREPARE_STEP_WRITES writes."""
    latest = yield from _applied_writes_steps(batch.writes, stats)

    records: list[tuple[Any, ...]] = []
    typed: dict[str, list[tuple[Any, ...]]] = {}
    d_uri: list[str] = []
    d_did: list[str] = []
    d_col: list[str] = []
    d_rev: list[str] = []
    # In uri order: concurrent transactions (live + backfill on the same repo) then lock rows
    # in the same order and cannot deadlock each other; it also helps btree locality.
    for n, uri in enumerate(sorted(latest), 1):
        if not n % PREPARE_STEP_WRITES:
            yield
        w = latest[uri]
        if w.action == _DELETE:  # == : a plain "delete" str counts too
            d_uri.append(uri)
            d_did.append(w.did)
            d_col.append(w.collection)
            d_rev.append(w.rev)
            continue
        both = rows_of(w, uri)
        if both is None:
            stats.invalid += 1
            continue
        records.append(both[0])
        if w.sanitized:
            stats.sanitized += 1
        t = both[1]
        if t is not None:
            table = typed.get(t[0])
            if table is None:
                table = typed[t[0]] = []
            table.append(t[1])
    written = heads_from_writes(latest.values())
    return PreparedRows(
        records=records,
        typed=typed,
        deletes=(d_uri, d_did, d_col, d_rev),
        heads=heads_with(heads, written),
        claims=[h[0] for h in written],
    )


def heads_with(heads: Sequence[RepoHead] | None, written: list[RepoHead]) -> list[RepoHead]:
    """A batch's heads: the caller's (None: those of the writes, `written`), plus the head
    of every repo written that they leave out: a headless actors row must mean "no rows, no
    tombstones" (fresh.py), so every repo written gets a head in the same transaction."""
    if heads is None:
        return written
    named = {h[0] for h in heads}
    return latest_heads([*heads, *(h for h in written if h[0] not in named)])


def last_per_did(events: Iterable[Any]) -> list[Any]:
    """Events applied in seq order: the last one per did wins. Returned in did order (the
    lock order of every statement here)."""
    last: dict[str, Any] = {}
    for e in sorted(events, key=lambda e: e.seq):
        last[e.did] = e
    return [last[did] for did in sorted(last)]


_dumps = orjson.dumps
_Fragment = orjson.Fragment  # already-serialized JSON, embedded as is


NO_ROWS = b"[]"


def rows_json(rows: list[tuple[Any, ...]]) -> bytes:
    """Rows -> the one rows parameter of queries.*_UPSERT (queries.rows_param): a JSON array
    of row arrays, UTF-8. Datetimes become RFC 3339 strings (aware, so with their offset),
    lists JSON arrays."""
    return _dumps(rows)


def records_json(rows: list[tuple[Any, ...]]) -> bytes:
    """Like `rows_json` for `rows.rows_of` records rows, whose record column is the record
    itself: one orjson call for the whole batch (1.6-1.8 µs per record instead of 4.2-4.3
    with one call per record, same output, in a microbenchmark of synthetic records). A
    record that call refuses (surrogates, integers beyond 64 bits, values JSON has no form
    for) or whose text would hold \\u0000, which jsonb refuses, sends the batch through
    `rows.record_json` record by record, which cleans them (DESIGN.md invariant 5)."""
    try:
        text = _dumps(rows)
        if b"\\u0000" not in text:
            return text
    except (TypeError, ValueError):
        pass
    i = RECORD_COLUMN
    return _dumps([(*r[:i], _Fragment(record_json(r[i])), *r[i + 1 :]) for r in rows])


@dataclass(slots=True)
class PreparedBatch:
    """A batch turned into rows and statement arguments: everything `apply_prepared` needs,
    computed without the database, so the worker can build batch N+1 while batch N's
    transaction runs on the server."""

    batch: Batch
    stats: ApplyStats
    rows: PreparedRows
    identities: list[Any]
    accounts: list[Any]
    # the rows parameters (queries.rows_param): records rows, and (table, rows) per typed table
    records: bytes | None
    typed: list[tuple[str, bytes]]
    resyncs: list[tuple[str, str]]  # (did, reason), one per did (the first), in did order
    # The per-row parameters of the other inserts, as JSON (queries.PER_ROW_JSON): the heads,
    # the identities' and the accounts' rows.
    heads_json: bytes
    identities_json: bytes
    accounts_json: bytes


def prepare_batch(batch: Batch, heads: Sequence[RepoHead] | None = None) -> PreparedBatch:
    """The pure half of `apply_batch` (no I/O). The records' JSON in one call (no parts)."""
    stats = ApplyStats()
    return drain(statement_args(batch, stats, prepare(batch, stats, heads), part_rows=None))


def prepare_steps(
    batch: Batch, heads: Sequence[RepoHead] | None = None
) -> Generator[None, None, PreparedBatch]:
    """`prepare_batch` in steps: a generator that suspends (a bare yield) after every
    PREPARE_STEP_WRITES writes turned into rows or JSON, and returns the PreparedBatch. The
    worker runs it on the event loop that also runs the previous batch's transaction, and
    lets that transaction's round trips through between steps (firehose.live.queue.LOOP_SLICE_S)."""
    stats = ApplyStats()
    prep = yield from _prepare_steps(batch, stats, heads)
    return (yield from statement_args(batch, stats, prep, PREPARE_STEP_WRITES))


def bulky_lists(prepared: PreparedBatch) -> list[list[Any]]:
    """The lists that hold most of a prepared batch's objects (its writes, its rows), for a
    caller that drops them a slice at a time (Committer._prepare) once the batch committed."""
    rows = prepared.rows
    return [prepared.batch.writes, rows.records, *rows.typed.values()]


def drain(steps: Generator[None, None, _T]) -> _T:
    """Run a generator of `*_steps` to its end: its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def statement_args(
    batch: Batch, stats: ApplyStats, prep: PreparedRows, part_rows: int | None
) -> Generator[None, None, PreparedBatch]:
    records = None
    if prep.records:
        # One JSON array in parts of `part_rows` rows (None: one part): their elements joined.
        step = part_rows or len(prep.records)
        parts = []
        for i in range(0, len(prep.records), step):
            parts.append(records_json(prep.records[i : i + step]))
            yield
        records = parts[0] if len(parts) == 1 else b"[" + b",".join(p[1:-1] for p in parts) + b"]"
    identities = last_per_did(batch.identities)
    accounts = last_per_did(batch.accounts)
    return PreparedBatch(
        batch=batch,
        stats=stats,
        rows=prep,
        identities=identities,
        accounts=accounts,
        records=records,
        typed=[(name, rows_json(rows)) for name, rows in prep.typed.items()],
        resyncs=_first_per_did(batch.resyncs),
        heads_json=rows_json(prep.heads),
        identities_json=rows_json([(e.did, e.handle, e.seq) for e in identities]),
        accounts_json=rows_json([(e.did, e.effective_status, e.active, e.seq) for e in accounts]),
    )


def _first_per_did(requests: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """One request per did (ON CONFLICT cannot touch a row twice in one statement), the first
    reason kept, in did order (the lock order of every statement here)."""
    first: dict[str, str] = {}
    for did, reason in requests:
        first.setdefault(did, reason)
    return sorted(first.items())
