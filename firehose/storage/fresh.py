"""Fresh repos: a snapshot of a repo the database has never seen, loaded without guards.

A backfill mostly meets repos the database knows nothing of: no records, no tombstones, no
head. For such a repo the rev guards of the upserts (queries.UPSERTS_APPLY) can only ever say
yes, yet they cost PostgreSQL about twice what a raw binary COPY costs (bench/pg_ceiling.py).
So `snapshots.write_snapshot` loads a fresh repo with plain INSERTs straight into `records` and
the typed tables (no guard, no ON CONFLICT: `load_statement`, one statement with the claim
below; a batch of at least snapshots.FRESH_COPY_MIN_RECORDS records sends its `records` rows by
COPY instead, after that statement and only if it claimed, in the same transaction:
copy_text.py), and keeps convergence with every other writer (DESIGN.md invariant 2) through
the repo's `actors` row, used as a per-repo lock that needs no shared lock-table entry:

* **Ownership.** A load owns a repo while it holds the repo's `actors` row and that row is
  exactly the version its own previous batch left (`xmin` = that batch's transaction id).
  It takes it in its first statement (`_claim`: the row is absent, or present but
  headless: `rev IS NULL`, never written by a commit or a snapshot, the account not deleted)
  or, for the next batch of the same snapshot, `_continue` (unchanged since our last
  batch). Several small repos' whole snapshots can share one statement
  (`group_statement`): each repo is claimed as `_claim` claims it, in did order, and only
  the rows of the repos it made ours are inserted. Each of these waits for a concurrent
  holder of the row and re-checks the newest version (READ COMMITTED re-evaluation);
  `_claim` and `_continue` take no lock when the answer is no, the group's statement keeps
  that row locked until it commits.
* **Every other writer claims first**, in its first statement, before any row of a batch
  (`writer.apply_prepared`): a snapshot writer runs `CLAIM`; the live stream runs its repo
  heads (queries.BATCH_HEADS with chain heads), which claim as well. Either inserts the
  missing `actors` rows of the repos it writes or, on conflict, locks the newest version of
  the row, which waits for a load's uncommitted insert or for a load holding the row; and
  it modifies every such row no live commit has touched yet (`chain_rev IS NULL`, which
  includes every row a load wrote), which ends that load's ownership by changing `xmin`.
  The writer's own statements after it take their snapshots after the wait, so they see
  the load's rows: their guards then apply against them as against any row. Taking the row
  first is also the lock order of every writer (did order, `actors` before the rows), so
  two writers of one repo wait for each other there and never deadlock further on.
* Every writer of rows also advances the repo head (`actors.rev`) in the same transaction
  (prepare.prepare adds the heads of written repos a caller left out), so a headless row
  really means "no rows, no tombstones".

Hence a load and another writer of the same repo are serialised: the load either commits
before the other writer's first row (which then sees it), or it writes nothing (the batch
takes the guarded path). Account deletions update the `actors` row (queries.ACTOR_ACCOUNTS)
and so end ownership too. A row the tables refuse (a uri twice, which a sane MST never
yields) rolls the attempt back and the batch takes the guarded path.
tests/test_storage_fresh.py races loads with live batches on two connections.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from firehose.storage import queries

# $1 did[] (sorted): the repos a batch writes. ON CONFLICT works on the newest version of a
# row, whatever the statement's snapshot: it waits for a load's uncommitted insert of the row
# and for a load holding it, then ends the load's ownership of every row no live commit has
# touched (`chain_rev IS NULL`, which includes every row a load wrote) with a new version.
# The other rows are only locked, in did order, until this transaction ends (the writer
# updates most of them anyway with their heads, at the end of the same transaction).
CLAIM = """
INSERT INTO actors AS a (did) SELECT d FROM unnest($1::text[]) AS d ORDER BY d
ON CONFLICT (did) DO UPDATE SET updated_at = now() WHERE a.chain_rev IS NULL
"""

# The rows of a fresh batch come as in queries.UPSERTS_APPLY: $1 the records rows, $2.. the
# rows of each typed table the statement names (below), each one JSON array of row
# arrays (queries.rows_param, b'[]' when none). They are INSERTed as they are (no guard, no
# ON CONFLICT: _inserts), only if the claim CTE `c` made the repo ours: the claim runs (and
# waits) to completion first, as the InitPlan of every insert. (asyncpg's binary COPY cost
# this process about five times more per record, in its encoding of datetimes and lists;
# the text COPY of the records rows that a big batch sends after this statement
# (snapshots._load_fresh, its records parameter then b'[]') is built by copy_text.py at ~1.3
# µs per record.)
#
# A first batch's statement names only the typed tables it may need
# (queries.statement_tables): a one-record repo cost 410-467 µs of PostgreSQL's CPU with all
# ten tables named against 236-297 with only its own, a ten-record repo 810-918 against
# 646-754 (one connection, write_snapshot, 2,000 repos, alternating, loads 0.35-0.63;
# docs/performance-log.md, session 21). Most repos of the network are that small. A snapshot's
# later batches (`continuing`, the middle of a big repo) name every table.


def _claim(did: str, rev: str, data_cid: str) -> str:
    """The claim of a repo not written yet: absent (inserted) or headless and not deleted
    (updated). No row, and no lock taken, otherwise."""
    return f"""
u AS (
UPDATE actors AS a SET rev = {rev}::text, data_cid = {data_cid}::text, updated_at = now()
 WHERE a.did = {did}::text AND a.rev IS NULL AND a.status <> 'deleted'
RETURNING a.xmin::text AS xmin),
i AS (
INSERT INTO actors (did, rev, data_cid, updated_at)
SELECT {did}::text, {rev}::text, {data_cid}::text, now()
 WHERE NOT EXISTS (SELECT 1 FROM actors WHERE did = {did}::text)
ON CONFLICT (did) DO NOTHING
RETURNING xmin::text AS xmin),
c AS (SELECT xmin FROM u UNION ALL SELECT xmin FROM i)"""


def _continue(did: str, rev: str, data_cid: str, xmin: str) -> str:
    """The next batch of a snapshot: the row is still the version our previous batch left
    (`xmin`). The head never goes backwards, as in queries.BATCH_HEADS."""
    return f"""
c AS (
UPDATE actors AS a
   SET rev = CASE WHEN a.rev < {rev}::text THEN {rev}::text ELSE a.rev END,
       data_cid = CASE WHEN a.rev < {rev}::text THEN {data_cid}::text ELSE a.data_cid END,
       updated_at = now()
 WHERE a.did = {did}::text AND a.xmin = {xmin}::text::xid
RETURNING a.xmin::text AS xmin)"""


def _inserts(tables: tuple[str, ...], where: str) -> list[str]:
    """The CTEs r (the records rows, $1) and t0.. (the rows of each of `tables`, $2..):
    plain INSERTs of the rows `s` for which `where` holds (no guard, no ON CONFLICT)."""

    def insert(table: str, columns: tuple[tuple[str, str], ...], param: int) -> str:
        names = ", ".join(c for c, _ in columns)
        rows = queries.rows_select(columns, param)
        return f"INSERT INTO {table} ({names}) SELECT * FROM ({rows}) s WHERE {where}"

    ctes = ["r AS (" + insert("records", queries.RECORDS_COLUMNS, 1) + " RETURNING 1)"]
    for i, name in enumerate(tables):
        t = queries.TYPED_TABLES_BY_NAME[name]
        sql = insert(t.name, queries.COMMON_TYPED_COLUMNS + t.columns, i + 2)
        ctes.append(f"t{i} AS (" + sql + " RETURNING 1)")
    return ctes


def _with(ctes: list[str], claimed: str, tables: tuple[str, ...], async_: str) -> str:
    """A load: its CTEs (the claim `c`, then _inserts'), returning what the claim made ours
    (`claimed`), the records and typed rows inserted, and the asynchronous commit ($async_)."""
    typed = queries.rows_written(len(tables))
    return (
        "WITH "
        + ",\n".join(ctes)
        + f"\nSELECT {claimed}, (SELECT count(*) FROM r) AS inserted, {typed} AS typed,"
        + f" {queries.async_commit_if(async_)} AS sync"
    )


@functools.cache
def load_statement(tables: tuple[str, ...], *, continuing: bool) -> str:
    """The fresh load of a batch whose typed rows go to `tables` (queries.statement_tables,
    or queries.TYPED_ORDER). Parameters: the records rows ($1), the rows of each of `tables`,
    then did, rev, data_cid, asynchronous commit (see writer._ASYNC_COMMIT) and, when
    `continuing` (`_continue`), the xmin our previous batch left. Returns xmin (NULL: not
    ours, nothing written), inserted (records rows), typed. Bounded: 2^5 x 2 + 1 statements."""
    n = 2 + len(tables)  # the first parameter after the rows
    did, rev, data_cid, async_, xmin = (f"${n + i}" for i in range(5))
    claim = _continue(did, rev, data_cid, xmin) if continuing else _claim(did, rev, data_cid)
    ctes = [claim.strip(), *_inserts(tables, "EXISTS (SELECT 1 FROM c)")]
    return _with(ctes, "(SELECT xmin FROM c) AS xmin", tables, async_)


# Small fresh repos together (together.write_snapshots): a whole snapshot of fewer than
# snapshots.FRESH_COPY_MIN_RECORDS records is one batch, and for such a repo the statement, its
# round trip and its commit were most of what loading it cost. One statement loads several:
# $1 the records rows and $2.. the rows of each of `tables` of all of them, then the heads
# ($n: HEAD_COLUMNS rows, one per repo) and the asynchronous commit. The claim `c` is
# _claim's, one row per repo, taken in did order (the lock order of every writer, fresh.py's
# docstring): absent (inserted) or headless and not deleted (updated), each re-checked on
# the newest version after any wait. A repo the claim does not make ours writes nothing: its
# rows fail `did IN c`. Unlike _claim, the ON CONFLICT form keeps such a row locked until
# the statement commits (PostgreSQL locks before it evaluates the WHERE), in did order like
# the rest; the statement is its own short transaction. Returns the claimed dids and the
# xmin each got (Loads), the records and typed rows written.
#
# Measured (one connection, 2,400 synthetic repos, alternating chunks against one
# write_snapshot per repo, load 0.51-0.62): eight 10-record repos to a statement cost
# PostgreSQL 340 against 590 µs per repo and this process 170 against 330; one-record repos
# 70 against 190 and 40 against 170; 30-record repos 700 against 1,000 and 290 against 440.


@functools.cache
def group_statement(tables: tuple[str, ...]) -> str:
    """The fresh load of several repos' whole snapshots whose typed rows go to `tables`
    (queries.statement_tables). Bounded: 2^5 statements."""
    n = 2 + len(tables)  # the heads' parameter
    heads = queries.rows_select(queries.HEAD_COLUMNS, n)
    ctes = [
        f"""c AS (
INSERT INTO actors AS a (did, rev, data_cid, updated_at)
SELECT h.did, h.rev, h.data_cid, now() FROM ({heads}) h ORDER BY h.did
ON CONFLICT (did) DO UPDATE
   SET rev = EXCLUDED.rev, data_cid = EXCLUDED.data_cid, updated_at = now()
 WHERE a.rev IS NULL AND a.status <> 'deleted'
RETURNING a.did, a.xmin::text AS xmin)""",
        *_inserts(tables, "s.did IN (SELECT did FROM c)"),
    ]
    claimed = "ARRAY(SELECT did FROM c) AS dids, ARRAY(SELECT xmin FROM c) AS xmins"
    return _with(ctes, claimed, tables, f"${n + 1}")


# A snapshot's batches come one after another, each in its own transaction, possibly on
# different pooled connections: the xmin each left is remembered per (did, snapshot rev).
# Only a hint: the database decides (`_continue`), a stale entry means the guarded path.
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
