"""Live-path benchmark: devnet frames as fast as the worker takes them.

A devnet relay (subprocess, `--rate 0`: every frame generated before the clock starts)
serves N events; the worker runs in this process against a fresh embedded PostgreSQL,
starting at cursor 0. Printed: committed events/s and records/s, p50/p99 read→commit
latency, peak RSS of this process (the worker), and decode-only events/s over the first
20,000 frames for comparison; then one JSON line.

    python bench/live.py [--events 200000] [--accounts 1000] [--seed 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firehose.protocol.frames import decode_frame  # noqa: E402
from firehose.settings import Settings  # noqa: E402
from firehose.storage.embedded import start_embedded  # noqa: E402
from firehose.worker import Worker  # noqa: E402

DECODE_ONLY_FRAMES = 20_000
RSS_SAMPLE_S = 0.25


def start_devnet(tmp: Path, events: int, accounts: int, seed: int) -> tuple[subprocess.Popen, str]:
    log = tmp / "devnet.log"
    truth = tmp / "truth.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firehose.devnet", "--events", str(events), "--rate", "0",
         "--accounts", str(accounts), "--seed", str(seed), "--port", "0", "--truth", str(truth)],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    started = time.monotonic()
    while not truth.exists():
        if proc.poll() is not None:
            raise SystemExit(f"devnet failed:\n{log.read_text()}")
        time.sleep(0.2)
    url = re.search(r"listening on (ws://\S+)", log.read_text())
    assert url, log.read_text()
    print(f"devnet: {events:,} events generated in {time.monotonic() - started:.1f} s")
    return proc, url.group(1)


async def run_worker(dsn: str, relay_url: str, events: int) -> dict[str, float]:
    settings = Settings.from_env(
        {"DATABASE_URL": dsn, "RELAY_URL": relay_url, "START_CURSOR": "0", "METRICS_PORT": "0"}
    )
    worker = Worker(settings, CollectorRegistry())
    worker.latency_samples = []
    proc = psutil.Process()
    peak_rss = proc.memory_info().rss
    task = asyncio.create_task(worker.run())
    # The clock starts at the first committed batch (start-up and migrations excluded).
    while worker.state.events_committed == 0:
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    t0, base = time.perf_counter(), worker.state.events_committed
    records0 = int(worker.metrics.ops.labels("create")._value.get())
    while (worker.state.cursor or 0) < events:
        await asyncio.sleep(RSS_SAMPLE_S)
        peak_rss = max(peak_rss, proc.memory_info().rss)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - t0
    committed = worker.state.events_committed - base
    ops = sum(
        worker.metrics.ops.labels(a)._value.get() for a in ("create", "update", "delete")
    ) - records0
    worker.stop()
    await task
    lat = sorted(worker.latency_samples)
    return {
        "events_per_s": committed / elapsed,
        "records_per_s": ops / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "peak_rss_mb": peak_rss / 2**20,
        "elapsed_s": elapsed,
        "events": committed,
    }


async def decode_only(relay_url: str, n: int) -> float:
    frames: list[bytes] = []
    url = f"{relay_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    async with connect(url, max_size=None, compression=None) as ws:
        while len(frames) < n:
            message = await ws.recv()
            assert isinstance(message, bytes)
            frames.append(message)
    t0 = time.perf_counter()
    for frame in frames:
        decode_frame(frame)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        devnet, url = start_devnet(tmp, args.events, args.accounts, args.seed)
        pg = start_embedded(tmp / "pg")
        try:
            result = uvloop.run(run_worker(pg.dsn, url, args.events))
            result["decode_only_events_per_s"] = uvloop.run(decode_only(url, DECODE_ONLY_FRAMES))
        finally:
            pg.stop()
            devnet.terminate()
    print(f"committed: {result['events']:,} events in {result['elapsed_s']:.1f} s")
    print(f"events/s committed: {result['events_per_s']:,.0f}")
    print(f"records/s committed: {result['records_per_s']:,.0f}")
    print(f"read->commit latency: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
    print(f"peak RSS (worker process): {result['peak_rss_mb']:.0f} MB")
    print(f"decode-only events/s: {result['decode_only_events_per_s']:,.0f}")
    print(json.dumps({"bench": "live", **{k: round(v, 2) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
