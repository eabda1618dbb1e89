"""Embedded PostgreSQL (pgserver): database `atproto` created, data survives a restart, the
server runs at the worker's own CPU priority, with EMBEDDED_SETTINGS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import psutil
import pytest

from firehose.storage.embedded import (
    DATABASE_NAME,
    EMBEDDED_SETTINGS,
    start_embedded,
)


@pytest.mark.slow
async def test_embedded_restart_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "pg"  # parents are created
    pg = await asyncio.to_thread(start_embedded, data_dir)
    try:
        assert pg.dsn.split("?")[0].endswith("/" + DATABASE_NAME)
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "atproto"
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            # No lower priority (embedded.py: with the backfill's helper processes it no
            # longer helps): the postmaster and the backends it forks run at the worker's own.
            backend = psutil.Process(conn.get_server_pid())
            assert backend.nice() == psutil.Process().nice()
            assert backend.parent().nice() == backend.nice()
            for name, value in EMBEDDED_SETTINGS.items():
                assert await conn.fetchval(f"SHOW {name}") == value
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
    pg.stop()  # idempotent

    pg = await asyncio.to_thread(start_embedded, data_dir)
    try:
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 7
            for name, value in EMBEDDED_SETTINGS.items():  # set again at the restart
                assert await conn.fetchval(f"SHOW {name}") == value
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(pg.dsn, timeout=2)
