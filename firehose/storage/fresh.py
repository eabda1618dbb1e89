"""Fresh repos: a snapshot of a repo the database has never seen, loaded at COPY cost.

A backfill mostly meets repos the database knows nothing of: no records, no tombstones, no
head. For such a repo the rev guards of the upserts (queries.UPSERTS_APPLY) can only ever say
yes, yet they cost PostgreSQL about twice what a raw binary COPY costs (bench/pg_ceiling.py).
So `writer.write_snapshot` loads a fresh repo with COPY straight into `records` and the typed
tables, and keeps convergence with every other writer (DESIGN.md invariant 2) through the
repo's `actors` row, used as a per-repo lock that needs no shared lock-table entry:

* **Ownership.** A load owns a repo while it holds the repo's `actors` row and that row is
  exactly the version its own previous batch left (`xmin` = that batch's transaction id).
  It takes it in its first statement (`FRESH_CLAIM`: the row is absent, or present but
  headless: `rev IS NULL`, never written by a commit or a snapshot, the account not deleted)
  or, for the next batch of the same snapshot, `FRESH_CONTINUE` (unchanged since our last
  batch). Either statement waits for a concurrent holder of the row and re-checks the newest
  version (READ COMMITTED re-evaluation), and takes no lock when the answer is no.
* **Every other writer claims first** (`CLAIM_NEW`, then `CLAIM_LOADING`, run by
  `writer.apply_prepared` before any row of a batch): it inserts the missing `actors` rows of
  the repos it writes, which waits for a load's uncommitted insert of that row; then it
  modifies every row of those repos that no live commit has touched yet (`chain_rev IS
  NULL`, which includes every row a load wrote), which waits for a load holding the row and,
  by changing `xmin`, ends that load's ownership. Both are separate statements, so each
  sees what committed while it waited, and the writer's own statements after them see the
  load's rows: its guards then apply against them as against any row.
* Every writer of rows also advances the repo head (`actors.rev`) in the same transaction
  (writer.prepare adds the heads of written repos a caller left out), so a headless row
  really means "no rows, no tombstones".

Hence a load and another writer of the same repo are serialised: the COPY either commits
before the other writer's first row (which then sees it), or it does not happen (the batch
takes the guarded path). Account deletions update the `actors` row (queries.ACTOR_ACCOUNTS)
and so end ownership too. Anything the COPY refuses (a uri twice, which a sane MST never
yields) rolls the attempt back and the batch takes the guarded path.
tests/test_storage_fresh.py races loads with live batches on two connections.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from firehose.storage import queries

# $1 did[] (sorted): the repos a batch writes. Waits for a load's uncommitted insert.
CLAIM_NEW = """
INSERT INTO actors (did) SELECT d FROM unnest($1::text[]) AS d ORDER BY d
ON CONFLICT (did) DO NOTHING
"""
# $1 did[]: ends any load's ownership of these repos (a new row version, new xmin). Rows a
# live commit has touched (chain_rev set) are never loaded fresh: nothing to do there.
CLAIM_LOADING = """
UPDATE actors SET updated_at = now() WHERE did = ANY($1::text[]) AND chain_rev IS NULL
"""

# $1 did, $2 rev, $3 data_cid (the snapshot's head), $4 whether to make this transaction's
# commit asynchronous (see writer._ASYNC_COMMIT). One row (the new row version's xmin) when
# the repo is fresh and now ours: absent (inserted) or headless and not deleted (updated).
# No row, and no lock taken, otherwise.
FRESH_CLAIM = """
WITH u AS (
UPDATE actors AS a SET rev = $2, data_cid = $3, updated_at = now()
 WHERE a.did = $1 AND a.rev IS NULL AND a.status <> 'deleted'
RETURNING a.xmin::text AS xmin),
i AS (
INSERT INTO actors (did, rev, data_cid, updated_at)
SELECT $1, $2, $3, now() WHERE NOT EXISTS (SELECT 1 FROM actors WHERE did = $1)
ON CONFLICT (did) DO NOTHING
RETURNING xmin::text AS xmin)
SELECT x.xmin, CASE WHEN $4::bool THEN set_config('synchronous_commit', 'off', true) END
  FROM (SELECT xmin FROM u UNION ALL SELECT xmin FROM i) AS x
"""
# $1 did, $2 rev, $3 data_cid, $4 whether asynchronous commit, $5 the xmin our previous
# batch of this snapshot left. The head never goes backwards, as in queries.BATCH_FINISH.
FRESH_CONTINUE = """
UPDATE actors AS a
   SET rev = CASE WHEN a.rev < $2 THEN $2 ELSE a.rev END,
       data_cid = CASE WHEN a.rev < $2 THEN $3 ELSE a.data_cid END,
       updated_at = now()
 WHERE a.did = $1 AND a.xmin = $5::text::xid
RETURNING a.xmin::text AS xmin,
          CASE WHEN $4::bool THEN set_config('synchronous_commit', 'off', true) END
"""

TYPED_COLUMNS: dict[str, tuple[str, ...]] = {
    t.name: t.all_columns for t in queries.TYPED_TABLES.values()
}

# A snapshot's batches come one after another, each in its own transaction, possibly on
# different pooled connections: the xmin each left is remembered per (did, snapshot rev).
# Only a hint: the database decides (FRESH_CONTINUE), a stale entry means the guarded path.
# None: known not fresh (skip the attempt). Bounded: BACKFILL_MAX_CONCURRENT is at most 64.
LOADS_MAX_ENTRIES = 4096


class Loads:
    """(did, rev) -> the xmin of our last fresh batch, or None when known not fresh."""

    def __init__(self, max_entries: int = LOADS_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def get(self, key: tuple[str, str]) -> tuple[bool, str | None]:
        """(known, xmin)."""
        if key not in self._entries:
            return False, None
        self._entries.move_to_end(key)
        return True, self._entries[key]

    def put(self, key: tuple[str, str], xmin: str | None) -> None:
        self._entries[key] = xmin
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


async def copy_rows(
    conn: Any, records: list[tuple[Any, ...]], typed: dict[str, list[tuple[Any, ...]]]
) -> None:
    """Binary COPY of prepared rows (writer.prepare) into records and the typed tables."""
    if records:
        await conn.copy_records_to_table(
            "records", records=records, columns=queries.RECORDS_COLUMN_NAMES
        )
    for table in sorted(typed):
        await conn.copy_records_to_table(table, records=typed[table], columns=TYPED_COLUMNS[table])
