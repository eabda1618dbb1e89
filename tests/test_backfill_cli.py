"""`firehose backfill status|pause|resume|retry-failed|add|run --dry-run` on a real database."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from backfill import jobs, queue
from backfill.cli import handle
from firehose.cli import build_parser
from firehose.settings import Settings

DID = "did:plc:" + "a" * 24


async def cli(
    capsys: pytest.CaptureFixture[str], dsn: str, *argv: str, days: str = "0"
) -> tuple[int, str]:
    settings = Settings.from_env({"DATABASE_URL": dsn, "BACKFILL_DAYS": days})
    args = build_parser().parse_args(["backfill", *argv])
    code = await asyncio.to_thread(handle, args, settings)
    return code, capsys.readouterr().out


async def test_status_without_a_job(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await cli(capsys, db_dsn, "status")
    assert code == 1 and "No backfill job" in out


async def test_add_pause_resume_status_retry(
    db_dsn: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await cli(capsys, db_dsn, "add", DID, days="30")
    assert code == 0 and "1 new" in out
    assert await conn.fetchval("SELECT priority FROM backfill_repos") == queue.PRIORITY_REQUESTED
    code, out = await cli(capsys, db_dsn, "pause")
    assert code == 0 and await conn.fetchval("SELECT status FROM backfill_jobs") == "paused"
    code, out = await cli(capsys, db_dsn, "pause")
    assert code == 1 and "Nothing to pause" in out
    code, out = await cli(capsys, db_dsn, "resume")
    assert code == 0 and await conn.fetchval("SELECT status FROM backfill_jobs") == "running"
    job = await jobs.current_job(conn)
    assert job is not None
    (c,) = await queue.claim(conn, job.id, "x", 1, 60)
    await queue.mark_failed(conn, job.id, c.did, "x", "server_error: 503")
    code, out = await cli(capsys, db_dsn, "status", "--json")
    status = json.loads(out)
    assert status["repos"]["failed"] == 1 and status["failed_sample"][0]["did"] == DID
    assert status["days"] == 30 and status["status"] == "running"
    code, out = await cli(capsys, db_dsn, "status")
    assert "Repos:     0 done, 1 failed" in out and "ETA" in out
    code, out = await cli(capsys, db_dsn, "retry-failed")
    assert code == 0 and "1 failed repo(s) queued again" in out
    assert await conn.fetchval("SELECT state FROM backfill_repos") == "pending"


async def test_add_rejects_non_dids(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await cli(capsys, db_dsn, "add", "alice.example", days="30")
    assert code == 2


async def test_run_needs_backfill_days(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await cli(capsys, db_dsn, "run", "--dry-run")
    assert code == 2
