"""End to end through the devnet: relay subprocess → worker subprocess → PostgreSQL = truth."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    DevnetProcess,
    WorkerProcess,
    assert_matches_truth,
    cursor_of,
    free_port,
    scrape_metrics,
    wait_for_cursor,
)

pytestmark = pytest.mark.slow

EVENTS = 50_000
SEED = "11"


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetProcess]:
    """One devnet (50,000 events, generated up front) shared by the tests that need no faults."""
    tmp = tmp_path_factory.mktemp("devnet")
    relay = DevnetProcess.start(tmp, "--seed", SEED, "--events", str(EVENTS), "--rate", "0")
    yield relay
    relay.stop()


async def test_50k_events_equal_truth_and_metrics(
    devnet: DevnetProcess, db_dsn: str, tmp_path: Path
) -> None:
    truth = devnet.truth()
    port = free_port()
    worker = WorkerProcess.start(
        tmp_path, db_dsn, devnet.url, START_CURSOR="0", METRICS_PORT=str(port)
    )
    try:
        await wait_for_cursor(db_dsn, truth["last_seq"], worker=worker)
        await assert_matches_truth(db_dsn, truth)
        text = await scrape_metrics(port)
        assert re.search(r'firehose_events_total\{type="commit"\} [1-9]', text)
        assert re.search(
            r'firehose_ops_total\{action="create",collection="app.bsky.feed.post"\} [1-9]', text
        )
        assert re.search(r'firehose_ops_total\{action="create",collection="other"\} [1-9]', text)
        assert "process_resident_memory_bytes" in text
        assert f"firehose_cursor {float(truth['last_seq'])}" in text
        assert "firehose_lag_seconds" in text and "firehose_batch_commit_seconds_bucket" in text
        # SIGTERM: finish the batch in hand, save the cursor, exit 0 within 10 s.
        assert worker.terminate(timeout_s=10) == 0
        assert "worker stopped at cursor" in worker.log()
    finally:
        if worker.proc.poll() is None:
            worker.kill9()


async def test_kill9_five_times_then_equal_truth(
    devnet: DevnetProcess, db_dsn: str, tmp_path: Path
) -> None:
    truth = devnet.truth()
    rng = random.Random(5)
    worker = WorkerProcess.start(tmp_path, db_dsn, devnet.url, START_CURSOR="0")
    # The first run must commit once: later runs have no START_CURSOR and resume from the
    # saved cursor (with none saved they would start at the relay's live tip).
    await wait_for_cursor(db_dsn, 1, worker=worker)
    cursors = []
    for _ in range(5):
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        worker.kill9()
        cursors.append(await cursor_of(db_dsn))
        # Restart without START_CURSOR: resume from the cursor saved with the rows.
        worker = WorkerProcess.start(tmp_path, db_dsn, devnet.url)
    try:
        await wait_for_cursor(db_dsn, truth["last_seq"], worker=worker)
        await assert_matches_truth(db_dsn, truth)
        # When the killed worker had already committed the last seq, the cursor wait above
        # returns before the new worker has logged anything: wait for its start-up line.
        await wait_for_log(worker, "resuming 'firehose' from saved cursor")
    finally:
        worker.kill9()
    # The kills landed mid-run, not after the end.
    assert any(c is None or c < truth["last_seq"] for c in cursors), cursors


async def test_drops_every_1000_frames_and_malformed_frames(tmp_path: Path, db_dsn: str) -> None:
    relay = DevnetProcess.start(
        tmp_path,
        "--seed",
        SEED,
        "--events",
        "20000",
        "--rate",
        "0",
        "--drop-every",
        "1000",
        "--malformed-every",
        "400",
    )
    port = free_port()
    worker = WorkerProcess.start(
        tmp_path, db_dsn, relay.url, START_CURSOR="0", METRICS_PORT=str(port)
    )
    try:
        truth = relay.truth()
        await wait_for_cursor(db_dsn, truth["last_seq"], worker=worker)
        await assert_matches_truth(db_dsn, truth)
        text = await scrape_metrics(port)
        invalid = re.findall(r"firehose_invalid_total\{reason=\"(\w+)\"\} (\S+)", text)
        assert sum(float(n) for _, n in invalid) >= 20000 // 400 // 2, invalid
        reconnects = re.findall(r"firehose_reconnects_total\{reason=\"\w+\"\} (\S+)", text)
        assert sum(float(n) for n in reconnects) >= 15
    finally:
        worker.kill9()
        relay.stop()


async def wait_for_log(worker: WorkerProcess, text: str, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s * 10)):
        if text in worker.log():
            return
        if worker.proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not in worker log:\n{worker.log()[-3000:]}")


async def test_embedded_database_survives_restart(devnet: DevnetProcess, tmp_path: Path) -> None:
    """No DATABASE_URL: the worker starts PostgreSQL in DATA_DIR, and a restart resumes."""
    data_dir = tmp_path / "data"
    env = {"DATA_DIR": str(data_dir), "START_CURSOR": "0", "DATABASE_URL": ""}
    worker = WorkerProcess.start(tmp_path, "", devnet.url, **env)
    try:
        await wait_for_log(worker, "connected to relay")
        assert "DATABASE_URL is not set: starting embedded PostgreSQL in" in worker.log()
        await asyncio.sleep(3)
        assert worker.terminate() == 0
        stopped = re.search(r"worker stopped at cursor (\d+)", worker.log())
        assert stopped, worker.log()[-2000:]
        saved = int(stopped.group(1))
        env.pop("START_CURSOR")
        again = WorkerProcess.start(tmp_path, "", devnet.url, **env)
        await wait_for_log(again, "connected to relay")
        assert f"resuming 'firehose' from saved cursor {saved}" in again.log()
        assert again.terminate() == 0
    finally:
        if worker.proc.poll() is None:
            worker.kill9()
