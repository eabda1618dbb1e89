"""`bench/live.py --shards N`: the live stream followed by N sharded worker processes.

`--shards 1` is one `firehose run` process, the figure to compare N against (the same
start-up, measurement and process boundary).

Each shard is a real `python -m firehose run` with `WORKER_COUNT=N` and its own
`WORKER_ID`, on the same relay and database (docs/operations.md#sharded-workers). Every
shard reads every frame, decodes in full only its own repos' events, and saves its own
cursor row, so the stream is committed when the lowest shard cursor reaches the last seq.

The clock starts once every shard has committed a batch (start-up and migrations
excluded) and stops when every shard's cursor has reached `events`. Events/s counts the
stream's seqs in between; records/s sums the shards' `firehose_ops_total`; CPU and peak RSS
are those of all the shard processes. Read→commit latency is the in-process worker's
figure, so it is not printed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import psutil

from bench.common import CpuTracker, MachineLoad

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05
START_TIMEOUT_S = 120.0
_OPS = re.compile(r"^firehose_ops_total\{[^}]*\} (\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_shards(
    tmp: Path, dsn: str, relay_url: str, shards: int
) -> list[tuple[subprocess.Popen, int]]:
    """The N worker processes and their metrics ports."""
    started = []
    for worker_id in range(shards):
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "RELAY_URL": relay_url,
            "START_CURSOR": "0",
            "WORKER_COUNT": str(shards),
            "WORKER_ID": str(worker_id),
            "METRICS_PORT": str(port),
        }
        log = (tmp / f"shard-{worker_id}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "firehose", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((proc, port))
    return started


async def _cursors(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT service, cursor FROM firehose_cursor")
    return {r["service"]: r["cursor"] for r in rows if r["cursor"] is not None}


async def _ops(session: aiohttp.ClientSession, ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            total += sum(float(n) for n in _OPS.findall(await response.text()))
    return total


def _check_alive(shards: list[tuple[subprocess.Popen, int]], tmp: Path) -> None:
    for i, (proc, _) in enumerate(shards):
        if proc.poll() is not None:
            raise SystemExit(f"shard {i} exited:\n{(tmp / f'shard-{i}.log').read_text()[-3000:]}")


async def run_shards(
    tmp: Path,
    dsn: str,
    relay_url: str,
    events: int,
    shards: int,
    cpu_procs: dict[str, Callable[[], list[psutil.Process]]],
) -> tuple[dict[str, float], MachineLoad]:
    """Run the shards from seq 0 until each cursor reaches `events`; `cpu_procs` are the
    other processes to measure ("worker", this process, is replaced by the shards)."""
    started = start_shards(tmp, dsn, relay_url, shards)
    ports = [port for _, port in started]
    procs = [psutil.Process(proc.pid) for proc, _ in started]
    conn: asyncpg.Connection | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while conn is None:
            _check_alive(started, tmp)
            try:  # the first shard creates the schema
                conn = await asyncpg.connect(dsn)
                await conn.fetch("SELECT 1 FROM firehose_cursor LIMIT 1")
            except (OSError, asyncpg.PostgresError):
                if conn is not None:
                    await conn.close()
                    conn = None
                if time.monotonic() > deadline:
                    raise SystemExit("shards did not create the schema") from None
                await asyncio.sleep(POLL_S)
        while len(cursors := await _cursors(conn)) < shards:
            _check_alive(started, tmp)
            if time.monotonic() > deadline:
                raise SystemExit(f"not every shard committed a batch: {cursors}")
            await asyncio.sleep(POLL_S / 5)
        async with aiohttp.ClientSession() as session:
            t0, base = time.perf_counter(), min(cursors.values())
            trackers = {"worker": CpuTracker(lambda: procs)}
            for name, listed in cpu_procs.items():
                if name != "worker":
                    trackers[name] = CpuTracker(listed)
            load = MachineLoad()
            ops0 = await _ops(session, ports)
            peak_rss = 0
            while min(cursors.values()) < events:
                _check_alive(started, tmp)
                await asyncio.sleep(POLL_S)
                cursors = await _cursors(conn)
                with contextlib.suppress(psutil.Error):
                    peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs))
            elapsed = time.perf_counter() - t0
            cpu = {name: tracker.stop() for name, tracker in trackers.items()}
            load.stop(sum(cpu.values()))
            ops = await _ops(session, ports) - ops0
    finally:
        if conn is not None:
            await conn.close()
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    committed = min(cursors.values()) - base
    result = {
        "events_per_s": committed / elapsed,
        "records_per_s": ops / elapsed,
        "peak_rss_mb": peak_rss / 2**20,
        "elapsed_s": elapsed,
        "events": committed,
        "shards": shards,
    }
    for name, seconds in cpu.items():
        result[f"cpu_ms_per_1k_events_{name}"] = seconds * 1000 / committed * 1000
    return result, load
