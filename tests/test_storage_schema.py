"""The migrated schema matches the column specs the writer generates its SQL from."""

from __future__ import annotations

import asyncpg

from firehose.storage import queries
from firehose.storage.writer import purge_accounts

PG_TYPES = {'text COLLATE "C"': "text", "timestamptz": "timestamp with time zone"}


async def columns(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, str | None]]:
    rows = await conn.fetch(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, c.collname
          FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
        """,
        table,
    )
    return {r["attname"]: (r["type"], r["collname"]) for r in rows}


async def test_typed_tables_match_spec(conn: asyncpg.Connection) -> None:
    for spec in queries.TYPED_TABLES.values():
        cols = await columns(conn, spec.name)
        common = [c for c, _ in queries.COMMON_TYPED_COLUMNS]
        assert list(cols) == [*common, "indexed_at", *(c for c, _ in spec.columns)], spec.name
        for name, pgtype in queries.COMMON_TYPED_COLUMNS + spec.columns:
            assert cols[name][0] == PG_TYPES.get(pgtype, pgtype), (spec.name, name)
        # Revs compare byte-wise whatever the database locale (TIDs sort as text).
        assert cols["rev"][1] == "C"
        assert cols["uri"][1] == "C"


async def test_records_match_spec(conn: asyncpg.Connection) -> None:
    cols = await columns(conn, "records")
    assert [c for c in cols if c != "indexed_at"] == list(queries.RECORDS_COLUMN_NAMES)
    assert cols["rev"][1] == "C" and cols["uri"][1] == "C"
    assert cols["record"][0] == "jsonb"
    assert (await columns(conn, "record_tombstones"))["rev"][1] == "C"
    assert (await columns(conn, "actors"))["rev"][1] == "C"


async def test_user_guide_cursor_query(conn: asyncpg.Connection) -> None:
    # The user guide's query, verbatim.
    await conn.execute("INSERT INTO firehose_cursor (service, cursor) VALUES ('backfill', 42)")
    rows = await conn.fetch("SELECT * FROM firehose_cursor WHERE service = 'backfill';")
    assert [tuple(r.keys()) for r in rows] == [
        ("service", "cursor", "last_event_time", "updated_at")
    ]
    assert rows[0]["cursor"] == 42


async def test_indexes(conn: asyncpg.Connection) -> None:
    names = {
        r["indexname"]
        for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    }
    assert "records_collection_created_at_idx" in names
    assert "records_did_idx" not in names  # dropped by 002: the uri prefix range serves it
    for idx in (
        "likes_subject_uri_idx",
        "reposts_subject_uri_idx",
        "follows_subject_did_idx",
        "blocks_subject_did_idx",
        "list_items_list_uri_idx",
        "posts_reply_root_uri_idx",
    ):
        assert idx in names


async def _fill_records(conn: asyncpg.Connection, dids: list[str], per_did: int) -> None:
    rows = [
        (f"at://{did}/app.bsky.feed.like/{i:013d}", did, "app.bsky.feed.like", f"{i:013d}",
         "bafyx", "3kaaaaaaaaa22", "{}", None)
        for did in dids
        for i in range(per_did)
    ]  # fmt: skip
    await conn.copy_records_to_table("records", records=rows, columns=queries.RECORDS_COLUMN_NAMES)
    await conn.execute("ANALYZE records")


def _plan(rows: list[asyncpg.Record]) -> str:
    return "\n".join(r[0] for r in rows)


async def test_account_rows_are_a_primary_key_range(conn: asyncpg.Connection) -> None:
    # `uri LIKE 'at://<did>/%'` can use the primary key.
    await conn.execute("SET enable_seqscan = off")
    plan = _plan(await conn.fetch("EXPLAIN SELECT * FROM records WHERE uri LIKE 'at://d/%'"))
    assert "records_pkey" in plan
    await conn.execute("RESET enable_seqscan")


async def test_purge_and_prune_read_the_primary_key_of_a_big_table(
    conn: asyncpg.Connection,
) -> None:
    # The planner's own choice, on a table big enough for a full scan to look cheap when
    # the bounds are unknown (the purge once hash-joined a full scan of every repo table
    # per batch of deleted accounts): with CUSTOM_PLANS, each account's range is read
    # through the primary key, also after the statement was prepared and cached (PostgreSQL
    # may switch a prepared statement to a generic plan after five executions).
    dids = [f"did:plc:{i:024d}" for i in range(400)]
    await _fill_records(conn, dids, 100)
    async with conn.transaction():
        await conn.execute(queries.CUSTOM_PLANS)
        for did in dids[:8]:
            purge = _plan(await conn.fetch("EXPLAIN " + queries.ACTOR_PURGE, did))
            prune = _plan(await conn.fetch("EXPLAIN " + queries.REPO_PRUNE, did, "3k"))
            for plan in (purge, prune):
                assert "Seq Scan on records" not in plan, plan
                assert "records_pkey" in plan, plan
            for table in queries.REPO_TABLES[1:]:
                assert f"Seq Scan on {table} " not in purge, purge


async def test_purge_accounts_removes_exactly_their_rows(conn: asyncpg.Connection) -> None:
    dids = [f"did:plc:{i:024d}" for i in range(30)]
    await _fill_records(conn, dids, 20)
    # A did that is a prefix of another must not take the other's rows with it.
    await _fill_records(conn, [dids[0] + "x"], 5)
    async with conn.transaction():
        purged = await purge_accounts(conn, dids[:3])
        # The rest of the caller's transaction keeps its prepared statements' plans.
        assert await conn.fetchval("SHOW plan_cache_mode") == "auto"
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await purge_accounts(conn, [dids[29]])
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    assert purged == 60
    left = await conn.fetch("SELECT did, count(*) AS n FROM records GROUP BY did")
    counts = {r["did"]: r["n"] for r in left}
    assert counts == {**{d: 20 for d in dids[3:29]}, dids[0] + "x": 5}
    # Outside a transaction too (the setting lives only as long as its own transaction).
    assert await purge_accounts(conn, [dids[3]]) == 20
    assert await conn.fetchval("SHOW plan_cache_mode") == "auto"


async def test_generated_sql_is_valid(conn: asyncpg.Connection) -> None:
    for sql in [queries.RECORDS_UPSERT, *queries.TYPED_UPSERT.values()]:
        await conn.prepare(sql)
    for sql in (
        queries.DELETES_APPLY,
        queries.BATCH_HEADS,
        queries.ACTOR_PURGE,
        queries.ACTOR_HEADS,
        queries.ACTOR_ACCOUNTS,
        queries.ACTOR_IDENTITIES,
        queries.CURSOR_SAVE,
    ):
        await conn.prepare(sql)
