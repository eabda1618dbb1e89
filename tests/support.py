"""End-to-end helpers: devnet and worker as real subprocesses, truth comparison."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from backfill_http import serve

from firehose.live.relay import SUBSCRIBE_PATH

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"listening on (ws://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DevnetProcess:
    proc: subprocess.Popen[str]
    url: str
    truth_path: Path

    @classmethod
    def start(cls, tmp: Path, *args: str, timeout_s: float = 120) -> DevnetProcess:
        truth = tmp / "truth.json"
        log = (tmp / "devnet.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "firehose.devnet", "--port", "0", "--truth", str(truth), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"devnet exited: {(tmp / 'devnet.log').read_text()[-2000:]}")
            match = URL_LINE.search((tmp / "devnet.log").read_text())
            if match and truth.exists():
                return cls(proc, match.group(1), truth)
            time.sleep(0.1)
        proc.kill()
        raise TimeoutError("devnet did not start")

    def truth(self) -> dict[str, Any]:
        return json.loads(self.truth_path.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    log_path: Path

    @classmethod
    def start(cls, tmp: Path, dsn: str, relay_url: str, **env: str) -> WorkerProcess:
        log_path = tmp / f"worker-{time.monotonic_ns()}.log"
        full_env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "RELAY_URL": relay_url,
            "METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "firehose", "run"],
            cwd=ROOT,
            env=full_env,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        return cls(proc, log_path)

    def log(self) -> str:
        return self.log_path.read_text()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@asynccontextmanager
async def serve_frames(frames: list[bytes]) -> AsyncIterator[str]:
    """A real websocket relay on a free port that sends `frames` (the i-th one after a cursor
    below i, counted from 1) then stays open and silent, like a relay at the tip. Yields its
    ws:// URL."""

    async def subscribe(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        cursor = int(request.query.get("cursor", "0"))
        for i, frame in enumerate(frames, start=1):
            if i > cursor:
                await ws.send_bytes(frame)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get(SUBSCRIBE_PATH, subscribe)
    async with serve(app) as base_url:
        yield "ws://" + base_url.removeprefix("http://")


async def scrape_metrics(port: int) -> str:
    """GET /metrics over real HTTP."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


async def cursor_of(dsn: str, service: str = "firehose") -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT cursor FROM firehose_cursor WHERE service = $1", service
        )
        return int(value) if value is not None else None
    finally:
        await conn.close()


async def wait_for_cursor(
    dsn: str,
    target: int,
    *,
    timeout_s: float = 120,
    worker: WorkerProcess | None = None,
    service: str = "firehose",
) -> None:
    """Until the cursor row `service` (`firehose:<i>` for a shard) reaches `target`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited {worker.proc.returncode}:\n{worker.log()[-3000:]}")
        cursor = await cursor_of(dsn, service)
        if cursor is not None and cursor >= target:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(
        f"cursor {service!r} did not reach {target} (at {await cursor_of(dsn, service)})"
    )


async def follow_until(
    tmp: Path, dsn: str, relay_url: str, last_seq: int, *, timeout_s: float = 45, **env: str
) -> tuple[str, str]:
    """A worker process following `relay_url` until its cursor reaches `last_seq` (a stall
    fails the test with the worker's log), then killed: the database holds what it
    committed. Returns its log and what its /metrics said at the end."""
    port = free_port()
    worker = WorkerProcess.start(tmp, dsn, relay_url, METRICS_PORT=str(port), **env)
    try:
        try:
            await wait_for_cursor(dsn, last_seq, worker=worker, timeout_s=timeout_s)
        except TimeoutError:
            raise AssertionError(f"the stream stalled:\n{worker.log()[-3000:]}") from None
        metrics = await scrape_metrics(port)
    finally:
        worker.proc.kill()
        worker.proc.wait(10)
    return worker.log(), metrics


COLLECTION_TABLES = {
    "app.bsky.feed.post": "posts",
    "app.bsky.feed.like": "likes",
    "app.bsky.feed.repost": "reposts",
    "app.bsky.graph.follow": "follows",
    "app.bsky.graph.block": "blocks",
    "app.bsky.actor.profile": "profiles",
    "app.bsky.graph.list": "lists",
    "app.bsky.graph.listitem": "list_items",
    "app.bsky.feed.generator": "feed_generators",
    "app.bsky.graph.starterpack": "starter_packs",
}


def did_of_uri(uri: str) -> str:
    """at://<did>/<collection>/<rkey> -> <did>."""
    return uri.split("/")[2]


def shard_truth(truth: dict[str, Any], owns: Callable[[str], bool]) -> dict[str, Any]:
    """The part of the truth about the DIDs `owns` accepts (one shard's expected rows)."""
    return {
        **truth,
        "records": {u: c for u, c in truth["records"].items() if owns(did_of_uri(u))},
        "deleted": [u for u in truth["deleted"] if owns(did_of_uri(u))],
        "handles": {d: h for d, h in truth["handles"].items() if owns(d)},
        "statuses": {d: s for d, s in truth["statuses"].items() if owns(d)},
    }


async def assert_matches_truth(dsn: str, truth: dict[str, Any]) -> None:
    """The tables equal the devnet's truth: every live record, nothing else, no doubles."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT uri, cid FROM records")
        stored = {r["uri"]: r["cid"] for r in rows}
        expected: dict[str, str] = truth["records"]
        missing = expected.keys() - stored.keys()
        extra = stored.keys() - expected.keys()
        wrong = [u for u in expected.keys() & stored.keys() if stored[u] != expected[u]]
        assert not missing, f"{len(missing)} records missing, e.g. {sorted(missing)[:3]}"
        assert not extra, f"{len(extra)} records not in truth, e.g. {sorted(extra)[:3]}"
        assert not wrong, f"{len(wrong)} records with a stale cid, e.g. {wrong[:3]}"
        deleted_present = set(truth["deleted"]) & stored.keys()
        assert not deleted_present, f"deleted records present: {sorted(deleted_present)[:3]}"

        # Typed tables: exactly the live records of their collection, each once.
        by_collection = Counter(u.split("/")[3] for u in expected)
        for collection, table in COLLECTION_TABLES.items():
            typed = await conn.fetch(f"SELECT uri, cid FROM {table}")
            typed_map = {r["uri"]: r["cid"] for r in typed}
            assert len(typed_map) == len(typed) == by_collection.get(collection, 0), table
            for uri, cid in typed_map.items():
                assert expected.get(uri) == cid, (table, uri)

        actors = {r["did"]: r for r in await conn.fetch("SELECT did, handle, status FROM actors")}
        for did, status in truth["statuses"].items():
            if did in actors or status != "active":
                assert actors[did]["status"] == status, (did, actors.get(did), status)
        for did, handle in truth["handles"].items():
            if did in actors and actors[did]["handle"] is not None:
                assert actors[did]["handle"] == handle, did
    finally:
        await conn.close()
