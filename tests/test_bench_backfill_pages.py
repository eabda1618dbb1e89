"""bench/backfill.py's data page counts (pg_stat_io): what PostgreSQL wrote out of its
buffers, extended its files by and read back, the bytes that cost it a quarter of its CPU in
a big run (docs/performance-log.md, session 27)."""

from __future__ import annotations

import asyncpg
import pytest

from bench.backfill import PAGES_IO


async def _pages(conn: asyncpg.Connection) -> dict[str, int]:
    # This backend's own counts reach the shared view once it has flushed them.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(await conn.fetchrow(PAGES_IO))


async def test_the_page_counts_follow_what_one_backend_writes(conn: asyncpg.Connection) -> None:
    """A temporary table three times the size of this session's buffers (temp_buffers): all of
    its pages are extended, and the ones that do not fit are written out, all by this backend,
    whose counts are flushed before each reading (nothing waits on another process)."""
    if conn.get_server_version().major < 16:  # a TEST_DATABASE_URL server may be older
        pytest.skip("pg_stat_io is new in PostgreSQL 16 (the bench's embedded server)")
    before = await _pages(conn)
    assert all(isinstance(v, int) and v >= 0 for v in before.values())
    buffers = int(
        await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'temp_buffers'")
    )
    await conn.execute("CREATE TEMP TABLE page_scratch (n int, pad text)")
    try:
        await conn.execute(
            "INSERT INTO page_scratch SELECT g, repeat('x', 900)"
            " FROM generate_series(1, $1::int) g",
            buffers * 8 * 3,  # eight rows of ~930 bytes fill a page
        )
        pages = await conn.fetchval("SELECT pg_relation_size('page_scratch') / 8192")
        assert pages >= buffers * 3 - 1
        after = await _pages(conn)
    finally:
        await conn.execute("DROP TABLE page_scratch")
    assert after["pages_extended"] - before["pages_extended"] >= pages
    assert after["pages_written"] - before["pages_written"] >= pages - buffers
