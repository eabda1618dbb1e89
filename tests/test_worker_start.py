"""Start-up against a database that fails right after it opened: the worker waits, retries
reading its saved cursor, and goes on; stop() during that wait ends run() cleanly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from firehose.settings import Settings
from firehose.worker import Worker
from tests.support import free_port


def _settings(dsn: str) -> Settings:
    # Nothing listens on the relay port: the relay client keeps retrying, which is all this
    # test needs (the start cursor is read before the first connection).
    return Settings.from_env(
        {
            "DATABASE_URL": dsn,
            "RELAY_URL": f"ws://127.0.0.1:{free_port()}",
            "METRICS_PORT": "0",
        }
    )


async def _wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while text not in caplog.text:
        assert asyncio.get_running_loop().time() < deadline, caplog.text[-2000:]
        await asyncio.sleep(0.05)


@asynccontextmanager
async def cursor_table_away(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[asyncpg.Connection, Worker, asyncio.Task[None]]]:
    """A worker started while `firehose_cursor` is renamed away (the migrations are recorded
    as applied, so start-up does not recreate it): yields once it failed to read its cursor."""
    caplog.set_level(logging.INFO, logger="firehose.worker")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("ALTER TABLE firehose_cursor RENAME TO firehose_cursor_away")
        worker = Worker(_settings(dsn), CollectorRegistry(), default_cursor=0)
        task = asyncio.create_task(worker.run())
        await _wait_for(caplog, "reading the saved cursor failed")
        assert not task.done()
        yield admin, worker, task
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_cursor_read_is_retried_until_the_database_answers(
    db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with cursor_table_away(db_dsn, caplog) as (admin, worker, task):
        await admin.execute("ALTER TABLE firehose_cursor_away RENAME TO firehose_cursor")
        await _wait_for(caplog, "no saved cursor for 'firehose': starting at 0")
        worker.stop()
        await asyncio.wait_for(task, 15)
    errors = worker.registry.get_sample_value("firehose_db_errors_total")
    assert errors is not None and errors >= 1


@pytest.mark.asyncio
async def test_stop_while_waiting_for_the_cursor_ends_run(
    db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with cursor_table_away(db_dsn, caplog) as (_, worker, task):
        worker.stop()
        await asyncio.wait_for(task, 15)  # returns, no exception
    assert "starting at 0" not in caplog.text
