"""Where a sharded worker starts: its own cursor row, else (WORKER_COUNT changed) the lowest
cursor of the other shards, else START_CURSOR's absence means the live tip."""

from __future__ import annotations

import asyncpg
import pytest

from firehose.settings import Settings
from firehose.storage import writer
from firehose.storage.database import Database
from firehose.worker import Worker


async def start_cursor(dsn: str, rows: dict[str, int], **env: str) -> int | None:
    """The cursor a worker configured by `env` would subscribe from, given these rows."""
    settings = Settings.from_env({"DATABASE_URL": dsn, **env})
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM firehose_cursor")
            for service, cursor in rows.items():
                await writer.save_cursor(conn, service, cursor)
        return await Worker(settings)._start_cursor(Database(pool, None))
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("rows", "env", "expected"),
    [
        # Nothing saved anywhere: the live tip (None).
        ({}, {"WORKER_COUNT": "3", "WORKER_ID": "1"}, None),
        # Its own row wins over the other shards'.
        ({"firehose:1": 500, "firehose:0": 100}, {"WORKER_COUNT": "3", "WORKER_ID": "1"}, 500),
        # 3 -> 4 workers: the new shard 3 starts at the lowest of the old shards' cursors.
        (
            {"firehose:0": 900, "firehose:1": 700, "firehose:2": 800},
            {"WORKER_COUNT": "4", "WORKER_ID": "3"},
            700,
        ),
        # 1 -> 2 workers: the single worker's `firehose` row counts too.
        ({"firehose": 400}, {"WORKER_COUNT": "2", "WORKER_ID": "0"}, 400),
        # 2 -> 1 worker: `firehose` starts at the lowest shard cursor.
        ({"firehose:0": 300, "firehose:1": 250}, {}, 250),
        # The backfill's row and look-alike names are not live-stream cursors.
        ({"backfill": 5, "firehosex": 6}, {"WORKER_COUNT": "2", "WORKER_ID": "1"}, None),
        # START_CURSOR always wins.
        ({"firehose:0": 300}, {"WORKER_COUNT": "2", "WORKER_ID": "1", "START_CURSOR": "7"}, 7),
    ],
)
async def test_start_cursor(
    db_dsn: str, rows: dict[str, int], env: dict[str, str], expected: int | None
) -> None:
    assert await start_cursor(db_dsn, rows, **env) == expected
