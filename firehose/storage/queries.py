"""Named SQL statements of the storage layer.

Rule (house style): identifiers come only from the constants of this module, every value is a
bind parameter or goes through COPY. The typed tables' statements are generated from one
column spec per table (`TYPED_TABLES`), which must match `sql/001_initial.sql`
(tests/test_storage_schema.py checks it against the migrated database).

Guards (DESIGN.md invariant 2) of the `records` upsert:
  * no tombstone of the uri has rev >= the new rev;
  * the stored row's rev is <= the new rev (an equal rev with the same cid is a replay: skipped
    so that replays write nothing);
  * the account is not `deleted`.
The typed tables then follow `records` (see _MIRROR_GUARD). Guards are scalar subqueries on
purpose: they always run as one primary-key probe per staged row, whereas a NOT EXISTS could be
planned as a hash anti-join scanning a whole (large) table when the unanalysed staging table
looks big.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

# --- migrations -------------------------------------------------------------------------------

MIGRATIONS_TABLE_EXISTS = "SELECT to_regclass('schema_migrations') IS NOT NULL"
MIGRATIONS_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
MIGRATION_RECORD = (
    "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, now())"
)
ADVISORY_LOCK = "SELECT pg_advisory_lock($1)"
ADVISORY_UNLOCK = "SELECT pg_advisory_unlock($1)"

# --- cursor -----------------------------------------------------------------------------------

CURSOR_LOAD = "SELECT cursor FROM firehose_cursor WHERE service = $1"
# The lowest live-stream cursor of the OTHER shards (`firehose`, `firehose:<i>`): where a
# worker whose shard has no row yet starts after WORKER_COUNT changed ('_' and '%' are LIKE
# wildcards, hence the explicit prefix test).
CURSOR_MIN_OF_OTHER_SHARDS = """
SELECT min(cursor) FROM firehose_cursor
 WHERE (service = 'firehose' OR left(service, 9) = 'firehose:') AND service <> $1
"""
CURSOR_SAVE = """
INSERT INTO firehose_cursor AS c (service, cursor, last_event_time, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (service) DO UPDATE
   SET cursor = EXCLUDED.cursor,
       last_event_time = coalesce(EXCLUDED.last_event_time, c.last_event_time),
       updated_at = now()
"""

# --- table specs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypedTable:
    """One typed table: its collection, name and the columns after the common ones."""

    collection: str
    name: str
    # (column, staging type) after COMMON_TYPED_COLUMNS; rows.py yields values in this order.
    columns: tuple[tuple[str, str], ...]

    @property
    def all_columns(self) -> tuple[str, ...]:
        return tuple(c for c, _ in COMMON_TYPED_COLUMNS) + tuple(c for c, _ in self.columns)


_ID = 'text COLLATE "C"'

# Common leading columns of every typed row (indexed_at is left to its default / now()).
COMMON_TYPED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("uri", _ID),
    ("did", _ID),
    ("rkey", _ID),
    ("cid", _ID),
    ("rev", _ID),
    ("created_at", "timestamptz"),
)

RECORDS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("uri", _ID),
    ("did", _ID),
    ("collection", _ID),
    ("rkey", _ID),
    ("cid", _ID),
    ("rev", _ID),
    ("record", "jsonb"),
    ("created_at", "timestamptz"),
)
RECORDS_COLUMN_NAMES = tuple(c for c, _ in RECORDS_COLUMNS)

_SUBJECT = (("subject_uri", _ID), ("subject_cid", _ID))

TYPED_TABLES: dict[str, TypedTable] = {
    t.collection: t
    for t in (
        TypedTable(
            "app.bsky.feed.post",
            "posts",
            (
                ("text", "text"),
                ("langs", "text[]"),
                ("reply_root_uri", _ID),
                ("reply_parent_uri", _ID),
                ("quote_uri", _ID),
                ("embed_kind", "text"),
                ("mentions", "text[]"),
                ("links", "text[]"),
                ("tags", "text[]"),
            ),
        ),
        TypedTable("app.bsky.feed.like", "likes", _SUBJECT),
        TypedTable("app.bsky.feed.repost", "reposts", _SUBJECT),
        TypedTable("app.bsky.graph.follow", "follows", (("subject_did", _ID),)),
        TypedTable("app.bsky.graph.block", "blocks", (("subject_did", _ID),)),
        TypedTable(
            "app.bsky.actor.profile",
            "profiles",
            (
                ("display_name", "text"),
                ("description", "text"),
                ("avatar_cid", _ID),
                ("banner_cid", _ID),
            ),
        ),
        TypedTable(
            "app.bsky.graph.list",
            "lists",
            (("name", "text"), ("purpose", "text"), ("description", "text")),
        ),
        TypedTable(
            "app.bsky.graph.listitem",
            "list_items",
            (("list_uri", _ID), ("subject_did", _ID)),
        ),
        TypedTable(
            "app.bsky.feed.generator",
            "feed_generators",
            (("service_did", _ID), ("display_name", "text"), ("description", "text")),
        ),
        TypedTable(
            "app.bsky.graph.starterpack",
            "starter_packs",
            (("name", "text"), ("description", "text"), ("list_uri", _ID)),
        ),
    )
}

# Tables holding rows of repos (purged when an account is deleted), records first.
REPO_TABLES: tuple[str, ...] = ("records", *(t.name for t in TYPED_TABLES.values()))

# --- upserts ---------------------------------------------------------------------------------
# A table's rows arrive as ONE jsonb parameter: a JSON array of rows, each row a JSON array of
# the column values in column order (positional, so no key is repeated per row). The server
# expands it with jsonb_array_elements(): one round trip and one parameter per table. (One
# array parameter per column, expanded with unnest(), cost the worker ~10 us per event in
# asyncpg's per-element array encoding; a COPY into ON COMMIT DELETE ROWS temp tables cost two
# round trips per table plus a DDL round trip, and truncating those eleven tables at every
# COMMIT alone took ~35 ms per batch.) The `record` column travels as the record's JSON itself
# (not a string), array columns of the typed tables (posts.langs, ...) as JSON arrays, and a
# JSON null is SQL NULL.

_GUARD = """
 WHERE coalesce((SELECT d.rev FROM record_tombstones d WHERE d.uri = s.uri) < s.rev, true)
   AND coalesce((SELECT a.status FROM actors a WHERE a.did = s.did) <> 'deleted', true)
"""


# A typed row mirrors the records row of its uri: it applies only if the records upsert just
# before left exactly this (rev, cid) in `records`, which already encodes every guard (one
# probe per row instead of re-checking tombstones and actors).
_MIRROR_GUARD = """
 WHERE coalesce((SELECT r.rev = s.rev AND r.cid = s.cid FROM records r WHERE r.uri = s.uri),
                false)
"""


def _column_value(i: int, pgtype: str) -> str:
    """Expression turning element `i` of a row (a jsonb array `u`) into the column's value."""
    if pgtype == _ID:
        return f'(u->>{i}) COLLATE "C"'  # same collation as the table: byte-wise compares
    if pgtype == "text":
        return f"u->>{i}"
    if pgtype == "jsonb":
        return f"u->{i}"
    if pgtype.endswith("[]"):
        element = pgtype[:-2]
        return (
            f"CASE WHEN jsonb_typeof(u->{i}) = 'array' THEN "
            f"ARRAY(SELECT jsonb_array_elements_text(u->{i}))::{element}[] END"
        )
    return f"(u->>{i})::{pgtype}"


def rows_param(n: int) -> str:
    """Parameter `n`, one batch's rows as the UTF-8 bytes of a JSON array of row arrays
    (prepare.records_json), as jsonb. Sent as bytea, the bytes orjson made go out as they are:
    as a jsonb parameter they had to be a str, decoded from those bytes and encoded back by
    asyncpg, which cost up to ~1 µs of our CPU per record of a batch with text outside
    Latin-1 (an emoji: a UCS-4 str; micro-benchmark, 100 batches of 500 records, two runs
    each way, load average 0.43-0.44: 0.84 -> 0.63 and 1.58 -> 0.42 µs per record in
    fetchrow alone, the decode not counted). PostgreSQL checks the UTF-8 in
    convert_from, as it did in jsonb's input."""
    return f"convert_from(${n}::bytea, 'UTF8')::jsonb"


def rows_select(columns: tuple[tuple[str, str], ...], n: int = 1) -> str:
    """A SELECT of parameter `n`'s rows (rows_param) as the named, typed `columns`: the
    upserts here, the fresh load's inserts (fresh.py) and the per-row JSON parameters."""
    values = ", ".join(f"{_column_value(i, t)} AS {c}" for i, (c, t) in enumerate(columns))
    return f"SELECT {values} FROM jsonb_array_elements({rows_param(n)}) AS u"


def _upsert_sql(table: str, columns: tuple[tuple[str, str], ...], guard: str) -> str:
    names = [c for c, _ in columns]
    cols = ", ".join(names)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in names if c != "uri")
    return (
        f"INSERT INTO {table} AS t ({cols}) SELECT {cols} FROM ({rows_select(columns)}) s{guard}"
        f"ON CONFLICT (uri) DO UPDATE SET {sets}, indexed_at = now() "
        "WHERE t.rev < EXCLUDED.rev OR (t.rev = EXCLUDED.rev AND t.cid <> EXCLUDED.cid)"
    )


# Run RECORDS_UPSERT first, then the typed upserts of the same batch.
RECORDS_UPSERT = _upsert_sql("records", RECORDS_COLUMNS, _GUARD)
TYPED_UPSERT: dict[str, str] = {
    t.name: _upsert_sql(t.name, COMMON_TYPED_COLUMNS + t.columns, _MIRROR_GUARD)
    for t in TYPED_TABLES.values()
}

# The same upserts as ONE statement (one round trip per batch instead of one per table):
# $1 is the records rows, $2.. the rows of each typed table in TYPED_TABLES order (b'[]' when
# none). Data-modifying CTEs all see the snapshot from before the statement, so a typed row's
# mirror guard is "its uri was upserted into records just now (the CTE's RETURNING) or
# records already held exactly this (rev, cid)": the same condition as _MIRROR_GUARD checked
# after the records upsert. (A write yields its records and typed rows with the same
# rev/cid; an upsert only touches a row whose (rev, cid) differs.) Returns
# (upserted, typed): rows written to records, and to the typed tables.
_FRESH_MIRROR_GUARD = """
 WHERE s.uri IN (SELECT r.uri FROM r)
    OR coalesce((SELECT x.rev = s.rev AND x.cid = s.cid FROM records x WHERE x.uri = s.uri),
                false)
"""


TYPED_ORDER: tuple[str, ...] = tuple(t.name for t in TYPED_TABLES.values())
TYPED_TABLES_BY_NAME = {t.name: t for t in TYPED_TABLES.values()}

# A statement that writes a repo's rows may name only the typed tables its batch needs. Each
# insert or upsert it names costs PostgreSQL its executor set-up, locks and plan-cache checks
# on every run, rows or not: most of what a small repo costs (docs/performance-log.md, session
# 21). The everyday tables of the app are named when the batch has rows for them, the others
# all together when it has rows for any of them (`statement_tables`): at most 2^5 x 2 shapes
# of each such statement, each prepared once per pooled connection.
PICKED_TABLES = frozenset({"posts", "likes", "reposts", "follows", "profiles"})
_OTHER_TABLES = tuple(n for n in TYPED_ORDER if n not in PICKED_TABLES)


def statement_tables(present: Iterable[str]) -> tuple[str, ...]:
    """The typed tables a statement names, in TYPED_ORDER, for a batch with rows for the
    tables `present`."""
    names = set(present)
    if not names.isdisjoint(_OTHER_TABLES):
        names.update(_OTHER_TABLES)
    return tuple(n for n in TYPED_ORDER if n in names)


def _upserts_ctes(tables: tuple[str, ...]) -> list[str]:
    """The CTEs r (records, $1) and t0.. (the typed `tables`, $2.. in that order)."""
    ctes = ["r AS (" + RECORDS_UPSERT + " RETURNING t.uri)"]
    for i, name in enumerate(tables):
        t = TYPED_TABLES_BY_NAME[name]
        sql = _upsert_sql(t.name, COMMON_TYPED_COLUMNS + t.columns, _FRESH_MIRROR_GUARD)
        ctes.append(f"t{i} AS (" + sql.replace(rows_param(1), rows_param(i + 2)) + " RETURNING 1)")
    return ctes


@functools.cache
def upserts_statement(tables: tuple[str, ...]) -> str:
    """The guarded upserts of records ($1) and of the typed `tables` ($2.., in that order) as
    one statement. Returns (upserted, typed)."""
    return (
        "WITH "
        + ",\n".join(_upserts_ctes(tables))
        + f"\nSELECT (SELECT count(*) FROM r) AS upserted, {rows_written(len(tables))} AS typed"
    )


@functools.cache
def snapshot_upserts_statement(tables: tuple[str, ...]) -> str:
    """A snapshot writer's batch without deletes in one statement, after its claim
    (writer.apply_prepared): upserts_statement(tables), then the repo heads (parameter
    len(tables) + 2, rows_param: HEAD_COLUMNS; never chain heads, snapshots.write_snapshot) and,
    when the bool parameter len(tables) + 3, the asynchronous commit (async_commit_if).
    Returns (upserted, typed, heads, sync).

    Safe as one statement: the claim before it already holds the repo's `actors` row, so
    the heads' upsert waits for nobody, and the guards' reads of `actors` (status) see what
    the claim saw, which the heads (rev, data_cid) do not change. Each small repo that is
    not fresh saves a round trip: five per batch (BEGIN, claim, upserts, heads, COMMIT)
    become four (docs/performance-log.md, session 22)."""
    n = len(tables)
    ctes = [*_upserts_ctes(tables), f"h AS ({heads_upsert(n + 2, 'false')})"]
    return (
        "WITH "
        + ",\n".join(ctes)
        + f"\nSELECT (SELECT count(*) FROM r) AS upserted, {rows_written(n)} AS typed,"
        + f" (SELECT count(*) FROM h) AS heads, {async_commit_if(f'${n + 3}')} AS sync"
    )


def rows_written(n: int) -> str:
    """The rows the CTEs t0 .. t{n-1} (one per typed table a statement names, each
    `RETURNING 1`) wrote, summed: 0 when it names none."""
    return " + ".join(f"(SELECT count(*) FROM t{i})" for i in range(n)) or "0"


UPSERTS_APPLY = upserts_statement(TYPED_ORDER)

# --- deletes ----------------------------------------------------------------------------------
# One statement for all deletes of a batch: $1..$4 are parallel arrays (uri, did, collection,
# rev), deduplicated by uri. Upsert the tombstone keeping the greatest rev, then delete the row
# from records and from the typed table of its collection where stored rev <= delete rev.
# Data-modifying CTEs on different tables run in one statement (one round trip); the join on
# the unnested arrays is a primary-key probe per deleted uri. (Arrays, not one JSON parameter
# as for the heads (PER_ROW_JSON): PostgreSQL plans `unnest` of a parameter at 10 rows and
# `jsonb_array_elements` at 100, and with 100 its cached generic plan joined `d` to records
# by hashing a scan of the whole table: 7.3 -> 26.7 ms of SQL per 1,000 live events. The
# heads' and the accounts' statements are inserts, whose conflicts are index probes whatever
# the estimate.)


def _delete_sql() -> str:
    ctes = [
        "d AS MATERIALIZED (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
        " AS d(uri, did, collection, rev))",
        "ts AS (INSERT INTO record_tombstones AS t (uri, did, rev, deleted_at)"
        " SELECT uri, did, rev, now() FROM d"
        " ON CONFLICT (uri) DO UPDATE SET rev = EXCLUDED.rev, did = EXCLUDED.did,"
        " deleted_at = now() WHERE t.rev < EXCLUDED.rev RETURNING 1)",
        "r AS (DELETE FROM records t USING d WHERE t.uri = d.uri AND t.rev <= d.rev RETURNING 1)",
    ]
    for i, t in enumerate(TYPED_TABLES.values()):
        # Collection names are constants of this module; written as literals so each CTE only
        # probes the uris of its own collection.
        ctes.append(
            f"x{i} AS (DELETE FROM {t.name} t USING d WHERE d.collection = '{t.collection}'"
            " AND t.uri = d.uri AND t.rev <= d.rev RETURNING 1)"
        )
    typed = " + ".join(f"(SELECT count(*) FROM x{i})" for i in range(len(TYPED_TABLES)))
    return (
        "WITH "
        + ",\n".join(ctes)
        + "\nSELECT (SELECT count(*) FROM ts) AS tombstones, (SELECT count(*) FROM r) AS deleted,"
        + f" {typed} AS typed"
    )


DELETES_APPLY = _delete_sql()

# --- actors -----------------------------------------------------------------------------------

# Latest commit per repo: $1 did[], $2 rev[], $3 data_cid[]; never goes backwards.
ACTOR_HEADS = """
INSERT INTO actors AS a (did, rev, data_cid, updated_at)
SELECT h.did, h.rev, h.data_cid, now()
  FROM unnest($1::text[], $2::text[], $3::text[]) AS h(did, rev, data_cid)
ON CONFLICT (did) DO UPDATE
   SET rev = EXCLUDED.rev, data_cid = EXCLUDED.data_cid, updated_at = now()
 WHERE a.rev IS NULL OR a.rev < EXCLUDED.rev
"""


def async_commit_if(param: str) -> str:
    """A statement's output column that, when the bool parameter `param` is true, makes its
    transaction commit asynchronously (`synchronous_commit = off`, local to the transaction:
    for a statement on its own, its implicit one). An output column runs exactly once. Pass
    false inside a caller's transaction: that commit is the caller's. Why it is safe where it
    is used: writer._ASYNC_COMMIT."""
    return f"CASE WHEN {param}::bool THEN set_config('synchronous_commit', 'off', true) END"


# PER_ROW_JSON: the small per-row parameters of inserts (heads, identities, accounts) go as
# one JSON array of row arrays like the rows (rows_param, rows_select), not as parallel text[]
# parameters: asyncpg encoded those at ~1 µs of our CPU per element (isinstance checks
# against the collections ABCs for every element, to find nested arrays), orjson the same
# rows at ~0.15 µs, and PostgreSQL read them in about the same time either way
# (micro-benchmark, 200 x 1,000 heads of three columns, three runs each: 2.83-3.13 against
# 0.39-0.47 µs of our CPU per head, 1.4 against 1.1 µs of PostgreSQL's wall time).
HEAD_COLUMNS: tuple[tuple[str, str], ...] = (("did", _ID), ("rev", _ID), ("data_cid", _ID))


def heads_upsert(rows: int, chain: str) -> str:
    """The repo heads of parameter `rows` (rows_param: HEAD_COLUMNS) into `actors`, as
    ACTOR_HEADS, and when the SQL bool `chain` is true also the chain heads
    `chain_rev`/`chain_data_cid` of sql/005; each never backwards. RETURNING 1 per head
    advanced (a CTE of BATCH_HEADS and of snapshot_upserts_statement)."""
    return f"""
INSERT INTO actors AS a (did, rev, data_cid, chain_rev, chain_data_cid, updated_at)
SELECT h.did, h.rev, h.data_cid, CASE WHEN {chain} THEN h.rev END,
       CASE WHEN {chain} THEN h.data_cid END, now()
  FROM ({rows_select(HEAD_COLUMNS, rows)}) h
ON CONFLICT (did) DO UPDATE
   SET rev = CASE WHEN a.rev IS NULL OR a.rev < EXCLUDED.rev THEN EXCLUDED.rev ELSE a.rev END,
       data_cid = CASE WHEN a.rev IS NULL OR a.rev < EXCLUDED.rev
                       THEN EXCLUDED.data_cid ELSE a.data_cid END,
       chain_rev = CASE WHEN {chain} AND (a.chain_rev IS NULL OR a.chain_rev < EXCLUDED.rev)
                        THEN EXCLUDED.rev ELSE a.chain_rev END,
       chain_data_cid = CASE WHEN {chain} AND (a.chain_rev IS NULL OR a.chain_rev < EXCLUDED.rev)
                             THEN EXCLUDED.data_cid ELSE a.chain_data_cid END,
       updated_at = now()
 WHERE a.rev IS NULL OR a.rev < EXCLUDED.rev
    OR ({chain} AND (a.chain_rev IS NULL OR a.chain_rev < EXCLUDED.rev))
RETURNING 1"""


# A batch's bookkeeping in one statement (writer.apply_prepared runs it first or last): the
# repo heads ($1, rows_param: HEAD_COLUMNS, may be empty; see PER_ROW_JSON),
# as ACTOR_HEADS, and with $8 also the chain heads `chain_rev`/`chain_data_cid` of sql/005,
# each never backwards), the cursor row ($2 service, $3 cursor, $4 last_event_time; nothing
# when $3 is NULL), the resync requests of the gate ($6 did[], $7 reason[], one per did; the
# rules are in sql/004_resync.sql) and, when $5, this transaction's synchronous_commit = off
# (it only matters at COMMIT). Returns the number of heads advanced and of resync requests
# queued or re-armed.
# A resync request (repo_resyncs, sql/004) for a row `q` already there: a pending one is kept
# as it is, one being resynced runs once more afterwards (`again`), a done or failed one is
# re-armed. Shared by BATCH_HEADS and backfill.resync_queries.RESYNC_REQUEST.
RESYNC_REQUEST_CONFLICT = """
ON CONFLICT (did) DO UPDATE
   SET state = CASE WHEN q.state = 'in_progress' THEN q.state ELSE 'pending' END,
       again = q.state = 'in_progress',
       reason = CASE WHEN q.state = 'in_progress' THEN q.reason ELSE EXCLUDED.reason END,
       requested_at = CASE WHEN q.state = 'in_progress' THEN q.requested_at ELSE now() END,
       attempts = CASE WHEN q.state = 'in_progress' THEN q.attempts ELSE 0 END,
       next_attempt_at = CASE WHEN q.state = 'in_progress' THEN q.next_attempt_at ELSE now() END,
       error = CASE WHEN q.state = 'in_progress' THEN q.error END,
       updated_at = now()
 WHERE q.state <> 'pending'
RETURNING 1
"""
BATCH_HEADS = (
    """
WITH q AS (
INSERT INTO repo_resyncs AS q (did, reason)
SELECT r.did, r.reason FROM unnest($6::text[], $7::text[]) AS r(did, reason)
"""
    + RESYNC_REQUEST_CONFLICT
    + f"""),
h AS ({heads_upsert(1, "$8::bool")}),
c AS (
INSERT INTO firehose_cursor AS c (service, cursor, last_event_time, updated_at)
SELECT $2::text, $3::bigint, $4::timestamptz, now() WHERE $3::bigint IS NOT NULL
ON CONFLICT (service) DO UPDATE
   SET cursor = EXCLUDED.cursor,
       last_event_time = coalesce(EXCLUDED.last_event_time, c.last_event_time),
       updated_at = now()
RETURNING 1)
SELECT (SELECT count(*) FROM h) AS heads, (SELECT count(*) FROM c) AS cursors,
       (SELECT count(*) FROM q) AS resyncs, """
    + async_commit_if("$5")
    + """ AS sync
"""
)

# --- sync 1.1 chain checks (firehose/live/chain.py) --------------------------------------------

# The chain heads of a slice's repos (sql/005_chain_heads.sql): $1 did[]. One primary-key
# probe per did. Only the live stream writes them (005's comment names resyncs too; they do not,
# see snapshots.write_snapshot).
CHAIN_HEADS_LOAD = """
SELECT did, chain_rev AS rev, chain_data_cid AS data_cid, active AND status <> 'deleted' AS active
  FROM actors WHERE did = ANY($1::text[])
"""

# #identity: $1 rows (rows_param, see PER_ROW_JSON) [did, handle (null keeps the stored
# handle), seq]. A handle is stamped handle_at = now(): a verified backfill handle observed
# before that moment never overwrites it (sql/007_handle_at.sql, backfill/handles.py).
ACTOR_IDENTITIES = f"""
INSERT INTO actors AS a (did, handle, handle_at, seq, updated_at)
SELECT i.did, i.handle, CASE WHEN i.handle IS NOT NULL THEN now() END, i.seq, now()
  FROM ({rows_select((("did", _ID), ("handle", "text"), ("seq", "bigint")))}) i
ON CONFLICT (did) DO UPDATE
   SET handle = coalesce(EXCLUDED.handle, a.handle),
       handle_at = CASE WHEN EXCLUDED.handle IS NOT NULL THEN now() ELSE a.handle_at END,
       seq = EXCLUDED.seq, updated_at = now()
"""

# #account: $1 rows (rows_param, see PER_ROW_JSON) [did, status, active, seq].
ACTOR_ACCOUNTS = f"""
INSERT INTO actors AS a (did, status, active, seq, updated_at)
SELECT e.did, e.status, e.active, e.seq, now()
  FROM ({rows_select((("did", _ID), ("status", "text"), ("active", "bool"), ("seq", "bigint")))}) e
ON CONFLICT (did) DO UPDATE
   SET status = EXCLUDED.status, active = EXCLUDED.active, seq = EXCLUDED.seq,
       updated_at = now()
"""


# The rows of one repo are the primary-key range 'at://<did>/' .. 'at://<did>0' ('0' follows
# '/' in byte order, sql/002), so the typed tables need no did index. The bounds are written as
# expressions of the did parameter, never taken from a CTE or a join: PostgreSQL then plans
# the statement with the did's own bounds (`CUSTOM_PLANS`, run first in the same transaction)
# and reads the range through the primary key. A bound that comes from a CTE or `unnest` is
# unknown to the planner, which assumes it covers 0.5% of the table per did and, from three
# dids on, preferred a hash join over a full scan of every repo table: each account deletion
# read the whole `records` table (200 ms at 190,000 rows, growing with the table; issue 11).
_LO = "('at://' || $1::text || '/')"
_HI = "('at://' || $1::text || '0')"

# Planner setting for the statements below, for the rest of the transaction: plan each
# execution with its parameter values, even once the statement is prepared and cached.
# Returns the setting it replaced (read first: the CTE's row exists before the outer select
# list runs), for RESTORE_PLANS.
CUSTOM_PLANS = """
WITH p AS MATERIALIZED (SELECT current_setting('plan_cache_mode') AS previous)
SELECT p.previous, set_config('plan_cache_mode', 'force_custom_plan', true) FROM p
"""
# $1 the setting CUSTOM_PLANS returned, for the rest of the transaction. A live batch that
# purged an account would otherwise plan its big statements (UPSERTS_APPLY, DELETES_APPLY) at
# every execution for the rest of its transaction: 2.0-2.4 and 0.6-1.6 ms more per call, empty
# (micro-benchmark, 100 calls each way, twice).
RESTORE_PLANS = "SELECT set_config('plan_cache_mode', $1, true)"


def _purge_sql() -> str:
    # The rows of a deleted account ($1 did), in records and every typed table.
    ctes = [
        f"p{i} AS (DELETE FROM {name} t"
        f" WHERE t.uri >= {_LO} AND t.uri < {_HI} AND t.did = $1 RETURNING 1)"
        for i, name in enumerate(REPO_TABLES)
    ]
    return "WITH " + ",\n".join(ctes) + "\nSELECT (SELECT count(*) FROM p0) AS purged"


# $1 did. Returns purged (records rows). After CUSTOM_PLANS (writer.purge_accounts).
ACTOR_PURGE = _purge_sql()


def _prune_sql() -> str:
    # A resync (backfill/resync.py) first writes every record of the repo's snapshot at the
    # snapshot's rev $2, which leaves each of them at rev >= $2 (the upsert moves an older
    # row to $2 even when its cid is unchanged; a newer live row keeps its newer rev). So the
    # rows of the repo ($1) still below $2 are exactly those the snapshot no longer has: they
    # are removed from records and every typed table, and tombstoned at $2 so that an older
    # create (a replay, a late event) cannot bring them back (invariant 2).
    ctes = [
        "g AS MATERIALIZED (SELECT r.uri FROM records r"
        f" WHERE r.uri >= {_LO} AND r.uri < {_HI} AND r.did = $1 AND r.rev < $2)",
        "ts AS (INSERT INTO record_tombstones AS t (uri, did, rev, deleted_at)"
        " SELECT g.uri, $1, $2, now() FROM g"
        " ON CONFLICT (uri) DO UPDATE SET rev = EXCLUDED.rev, did = EXCLUDED.did,"
        " deleted_at = now() WHERE t.rev < EXCLUDED.rev RETURNING 1)",
    ]
    for i, name in enumerate(REPO_TABLES):
        ctes.append(
            f"p{i} AS (DELETE FROM {name} t"
            f" WHERE t.uri >= {_LO} AND t.uri < {_HI} AND t.did = $1 AND t.rev < $2 RETURNING 1)"
        )
    return (
        "WITH "
        + ",\n".join(ctes)
        + "\nSELECT (SELECT count(*) FROM p0) AS removed, (SELECT count(*) FROM ts) AS tombstones"
    )


# $1 did, $2 the snapshot's rev. Returns (removed: records rows, tombstones written). After
# CUSTOM_PLANS (snapshots.prune_repo).
REPO_PRUNE = _prune_sql()
