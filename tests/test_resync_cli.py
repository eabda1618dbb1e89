"""`firehose resync DID...` and the resync counts of `firehose status` (real processes, real
PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import pytest
from support import ROOT


def firehose(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "firehose", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.asyncio
async def test_queue_by_hand_and_see_it_in_status(db_dsn: str) -> None:
    a, b = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:web:example.com"
    done = firehose(db_dsn, "resync", a, b, a)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 repos queued" in done.stdout
    again = firehose(db_dsn, "resync", a)
    assert "0 of 1 repos queued" in again.stdout  # already pending: one row
    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT did, reason, state FROM repo_resyncs ORDER BY did")
        await conn.execute("UPDATE repo_resyncs SET state = 'failed' WHERE did = $1", b)
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(a, "manual", "pending"), (b, "manual", "pending")]
    status = firehose(db_dsn, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["resyncs"] == {
        "pending": 1,
        "in_progress": 0,
        "done": 0,
        "failed": 1,
    }
    text = firehose(db_dsn, "status")
    assert "Resyncs:    1 pending, 0 in progress, 0 done, 1 failed" in text.stdout


def test_a_bad_did_is_refused(db_dsn: str) -> None:
    result = firehose(db_dsn, "resync", "not-a-did")
    assert result.returncode == 2 and "not a DID: not-a-did" in result.stderr
