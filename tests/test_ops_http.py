"""The operator's HTTP endpoints and `firehose status`, over real HTTP and real PostgreSQL.

/healthz, /status (a running in-process worker on an in-process devnet), /readyz following
a dedicated embedded PostgreSQL that is stopped and started again, the ADMIN_TOKEN-guarded
backfill pause/resume, `firehose status --json` (database and --url), and the database
password never showing in /status, the CLI output or the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from support import ROOT, free_port

from backfill import jobs
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.http import start_http
from firehose.ops import WorkerOps, WorkerState
from firehose.settings import Settings
from firehose.storage import writer
from firehose.storage.embedded import start_embedded
from firehose.worker import Worker

PASSWORD = "s3cret-Pw-4711"  # a test value that must never be echoed
TOKEN = "admin-token-for-tests"
WAIT_S = 60.0


def with_password(dsn: str) -> str:
    """`dsn` with a password in it (the test server trusts local connections, so it is
    accepted and ignored): proves it is never echoed."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def get(port: int, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if "json" in resp.content_type else text)


async def post(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", headers=headers or {}) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if "json" in resp.content_type else text)


async def wait_until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last}")


@contextlib.asynccontextmanager
async def running_worker(dsn: str, relay_url: str, **env: str) -> AsyncIterator[int]:
    port = free_port()
    settings = Settings.from_env(
        {
            "DATABASE_URL": dsn,
            "RELAY_URL": relay_url,
            "START_CURSOR": "0",
            "METRICS_PORT": str(port),
            **env,
        }
    )
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _status_up(port, task), "the worker's /status")
        yield port
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def _status_up(port: int, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raise the worker's error
    with contextlib.suppress(aiohttp.ClientError):
        status, body = await get(port, "/status")
        return status == 200 and body["relay_connected"] and body["events_committed"] > 0
    return False


async def test_healthz_status_fields_and_no_password(
    db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = with_password(db_dsn)
    config = DevnetConfig(seed=7, accounts=20, events=300)
    async with DevnetRelay(config) as relay, running_worker(dsn, relay.url) as port:
        assert await get(port, "/healthz") == (200, {"ok": True})

        async def caught_up() -> Any:
            _, body = await get(port, "/status")
            return body if body["cursor"] == config.events else None

        body = await wait_until(caught_up, "cursor at the last devnet seq")
        assert body["worker_id"] == 0 and body["worker_count"] == 1
        assert body["cursor_service"] == "firehose"
        assert body["events_committed"] == config.events
        assert body["relay_connected"] is True
        assert body["queue_depth"] == 0
        assert datetime.fromisoformat(body["last_event_time"]).tzinfo is not None
        assert body["lag_seconds"] >= 0
        assert body["backfill"] == {"enabled": False}

        status, ready = await get(port, "/readyz")
        assert status == 200, ready
        assert ready["checks"] == {"database": "ok", "migrations": "ok", "relay": "ok"}
        # ADMIN_TOKEN unset: the admin endpoints do not exist.
        assert (await post(port, "/backfill/pause"))[0] == 404
        _, raw = await get(port, "/status")
    assert PASSWORD not in json.dumps(raw)
    assert PASSWORD not in caplog.text


async def test_readyz_follows_a_dedicated_database(tmp_path: Path) -> None:
    pg = await asyncio.to_thread(start_embedded, tmp_path / "pg")
    try:
        async with (
            DevnetRelay(DevnetConfig(seed=8, accounts=10, events=100)) as relay,
            running_worker(pg.dsn, relay.url) as port,
        ):

            async def readyz(want: int) -> Any:
                status, body = await get(port, "/readyz")
                return body if status == want else None

            await wait_until(lambda: readyz(200), "ready")
            await asyncio.to_thread(pg.stop)
            down = await wait_until(lambda: readyz(503), "unready without the database")
            assert down["ready"] is False
            assert "database" in down["failed"]
            assert down["checks"]["relay"] == "ok"
            assert (await get(port, "/healthz"))[0] == 200  # alive, just not ready

            pg = await asyncio.to_thread(start_embedded, tmp_path / "pg")
            up = await wait_until(lambda: readyz(200), "ready again", timeout_s=30)
            assert up["ready"] is True
    finally:
        await asyncio.to_thread(pg.stop)


@contextlib.asynccontextmanager
async def ops_server(dsn: str, admin_token: str | None) -> AsyncIterator[int]:
    """The HTTP app on a WorkerOps of no running worker: enough for the admin endpoints."""
    port = free_port()
    settings = Settings.from_env({"DATABASE_URL": dsn})
    ops = WorkerOps(settings, WorkerState(), dsn=dsn, queue_depth=lambda: 0, lag_seconds=float)
    runner = await start_http(
        CollectorRegistry(), port, "127.0.0.1", ops=ops, admin_token=admin_token
    )
    assert runner is not None
    try:
        yield port
    finally:
        await runner.cleanup()
        await ops.close()


async def job_status_of(dsn: str, job_id: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT status FROM backfill_jobs WHERE id = $1", job_id))
    finally:
        await conn.close()


async def test_admin_pause_resume_need_the_token(db_dsn: str, conn: asyncpg.Connection) -> None:
    dsn = with_password(db_dsn)
    async with ops_server(dsn, TOKEN) as port:
        # No job yet: authorized, but nothing to act on.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await post(port, "/backfill/pause", auth))[0] == 409
        job = (await jobs.ensure_job(conn, 30, "ws://127.0.0.1:1", datetime.now(UTC))).job
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            status, body = await post(port, "/backfill/pause", headers)
            assert (status, body["error"]) == (401, "unauthorized"), headers
            assert (await post(port, "/backfill/resume", headers))[0] == 401
        assert await job_status_of(db_dsn, job.id) == "running"

        status, body = await post(port, "/backfill/pause", auth)
        assert (status, body) == (200, {"ok": True, "job_id": job.id, "was": "running"})
        assert await job_status_of(db_dsn, job.id) == "paused"
        assert (await post(port, "/backfill/pause", auth))[0] == 409  # already paused
        assert (await post(port, "/backfill/resume", auth))[0] == 200
        assert await job_status_of(db_dsn, job.id) == "running"

        # `firehose status --url` reads the same facts from /status.
        out = await firehose_cli("status", "--json", "--url", f"http://127.0.0.1:{port}")
        assert out["worker_id"] == 0 and out["relay_connected"] is False
    async with ops_server(dsn, None) as port:
        assert (await post(port, "/backfill/pause", auth))[0] == 404
        assert (await post(port, "/backfill/resume", auth))[0] == 404


async def firehose_cli(*args: str, **env: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firehose",
        *args,
        cwd=ROOT,
        env={**os.environ, "LOG_LEVEL": "WARNING", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode() + err.decode()
    assert PASSWORD not in text
    return json.loads(out) if "--json" in args else text


async def test_status_cli_from_the_database(db_dsn: str, conn: asyncpg.Connection) -> None:
    dsn = with_password(db_dsn)
    empty = await firehose_cli("status", "--json", DATABASE_URL=dsn)
    assert empty["cursor"] is None and empty["backfill"] == {"enabled": False}

    at = datetime.now(UTC)
    await writer.save_cursor(conn, "firehose", 4242, at)
    job = (await jobs.ensure_job(conn, 30, "ws://127.0.0.1:1", at)).job
    await conn.execute(
        "UPDATE backfill_jobs SET repos_total = 10, repos_done = 4 WHERE id = $1", job.id
    )
    out = await firehose_cli("status", "--json", DATABASE_URL=dsn)
    assert out["source"] == "database"
    assert out["cursor"] == 4242 and out["cursor_service"] == "firehose"
    assert datetime.fromisoformat(out["last_event_time"]) == at
    assert out["lag_seconds"] >= 0
    assert out["events_committed"] is None  # known only inside a running worker
    bf = out["backfill"]
    assert bf["enabled"] is True and bf["job_id"] == job.id and bf["progress_ratio"] == 0.4

    text = await firehose_cli("status", DATABASE_URL=dsn)
    assert "Cursor:     4242" in text
    assert "[############------------------]  40.0%" in text
