"""Embedded PostgreSQL (pgserver): database `atproto` created, data survives a restart, the
server runs at the worker's own CPU priority, with EMBEDDED_SETTINGS, and writes its WAL with
direct I/O where the file system allows it (and only there)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import psutil
import pytest

from firehose.storage import embedded
from firehose.storage.embedded import (
    DATABASE_NAME,
    DIRECT_IO,
    EMBEDDED_SETTINGS,
    RESTART_SETTINGS,
    direct_io_works,
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
            # A new data directory gets the settings that take a restart at its first start,
            # and direct I/O for its WAL where the file system takes O_DIRECT.
            for name, value in RESTART_SETTINGS.items():
                assert await conn.fetchval(f"SHOW {name}") == value
            direct = direct_io_works(data_dir)
            assert await conn.fetchval(f"SHOW {DIRECT_IO[0]}") == (DIRECT_IO[1] if direct else "")
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


def _skip_without_direct_io(directory: Path) -> None:
    if not direct_io_works(directory):  # the test machines' ext4 has it; tmpfs before 6.6 not
        pytest.skip(f"no O_DIRECT on the file system of {directory}")


def test_the_direct_io_probe_writes_a_page_and_leaves_nothing(tmp_path: Path) -> None:
    assert direct_io_works(Path("/proc")) is False  # no file can be created there
    _skip_without_direct_io(tmp_path)
    assert direct_io_works(tmp_path / "not" / "yet") is True  # its nearest existing parent
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
async def test_a_data_directory_moved_where_direct_io_fails_starts_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A data directory whose postgresql.auto.conf asks for direct I/O, started where the
    probe fails (a file system without O_DIRECT: the server would fail at its first WAL
    write), starts without it and keeps its data."""
    _skip_without_direct_io(tmp_path)
    data_dir = tmp_path / "pg"
    pg = await asyncio.to_thread(start_embedded, data_dir)
    try:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            assert await conn.fetchval(f"SHOW {DIRECT_IO[0]}") == DIRECT_IO[1]
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
    assert DIRECT_IO[0] in (data_dir / "postgresql.auto.conf").read_text()

    monkeypatch.setattr(embedded, "direct_io_works", lambda directory: False)
    with caplog.at_level(logging.WARNING, logger="firehose.db"):
        pg = await asyncio.to_thread(start_embedded, data_dir)
    try:
        assert "no direct I/O on this file system" in caplog.text
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval(f"SHOW {DIRECT_IO[0]}") == ""
            assert await conn.fetchval("SELECT x FROM kept") == 7
            for name, value in RESTART_SETTINGS.items():
                assert await conn.fetchval(f"SHOW {name}") == value
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
    assert DIRECT_IO[0] not in (data_dir / "postgresql.auto.conf").read_text()
