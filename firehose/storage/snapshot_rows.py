"""A repo snapshot's records straight to rows (pure, no I/O).

The backfill writes hundreds of records per repo, and for each the generic steps
(`prepare.prepare`: a `RecordWrite` built, its uri twice, the dedupe per uri, the sort, the
heads of the writes) cost about 0.7 µs more than the rows themselves need, ~2 % of what a
record costs this process and PostgreSQL together (docs/performance-log.md, session 34). A
snapshot's records need none of it: they are one repo's, CREATEs, and come in strictly
increasing key order (`firehose.protocol.mst.walk_mst` checks it), so no uri can
supersede another and the rows are already in uri order.

Invariant kept: `snapshot_rows` gives exactly what `prepare.prepare` gives for the same
records as RecordWrites (`model.snapshot_write`): the same rows in the same order, the same
heads and claims, the same counts; the row layouts and the storable rule are the ones of
rows.py. Records in any other order (a duplicated key, say) go through `prepare.prepare`
itself. tests/test_snapshot_rows.py checks the two against each other on any input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from firehose.model import Batch, SnapshotRecord, snapshot_write
from firehose.storage.prepare import ApplyStats, PreparedRows, RepoHead, heads_with, prepare
from firehose.storage.rows import created_at_of, records_layout, storable_ids, typed_layout


def snapshot_rows(
    did: str,
    records: Sequence[SnapshotRecord],
    heads: Sequence[RepoHead] | None,
    stats: ApplyStats,
) -> PreparedRows:
    """`prepare.prepare(Batch(writes=[snapshot_write(did, r) for r in records]), stats, heads)`,
    without the writes while the records' keys strictly increase."""
    prefix = f"at://{did}/"
    rows: list[tuple[Any, ...]] = []
    typed: dict[str, list[tuple[Any, ...]]] = {}
    last = ""
    top_rev: str | None = None  # the highest rev of the storable records
    invalid = sanitized = 0
    for collection, rkey, rev, cid, record, was_sanitized in records:
        uri = f"{prefix}{collection}/{rkey}"
        if uri <= last:  # not a walk's order: the generic steps dedupe and sort
            writes = [snapshot_write(did, r) for r in records]
            return prepare(Batch(writes=writes), stats, heads)
        last = uri
        if not storable_ids(uri, rev, cid):
            invalid += 1
            continue
        if top_rev is None or top_rev < rev:
            top_rev = rev
        if not isinstance(record, dict) or cid is None:  # as rows.rows_of
            invalid += 1
            continue
        at = created_at_of(record)
        row = records_layout(uri, did, collection, rkey, cid, rev, record, at)
        rows.append(row)
        if was_sanitized:
            sanitized += 1
        t = typed_layout(row)
        if t is not None:
            table = typed.get(t[0])
            if table is None:
                table = typed[t[0]] = []
            table.append(t[1])
    stats.writes += len(records)
    stats.invalid += invalid
    stats.sanitized += sanitized
    written: list[RepoHead] = [] if top_rev is None else [(did, top_rev, None)]
    return PreparedRows(
        records=rows,
        typed=typed,
        deletes=([], [], [], []),
        heads=heads_with(heads, written),
        claims=[did] if written else [],
    )
