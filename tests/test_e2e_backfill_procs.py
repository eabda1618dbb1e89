"""End to end: backfill processes (the unified worker, `firehose backfill run`) as real
subprocesses against the devnet's HTTP side (relay listRepos, PLC, 3 PDS hosts) and a real
PostgreSQL: kill -9 and resume, the concurrency limit, two processes on one job, the real
repository CARs, and the rate-limit pause as the status command shows it."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from backfill_support import (
    REAL_CARS,
    BackfillProcess,
    HistoryDevnet,
    RssSampler,
    assert_records_equal,
    backfill_cli,
    check_window_truth,
    expected_in_window,
    get_repo_counts,
    job_row,
    processed_counts,
    records_map,
    repo_rows,
    wait_job,
)

from firehose.protocol.car import read_car
from firehose.protocol.cid import cid_str_from_bytes
from firehose.protocol.mst import read_commit, walk_mst

pytestmark = pytest.mark.slow

# 30 accounts of firehose history over 60 days + 30 pre-populated repos (300 records each,
# spread over the same 60 days): about half of every repo is outside a 30-day window.
# Every getRepo answer waits 100 ms, so a backfill takes seconds, not milliseconds.
HISTORY_FLAGS = (
    "--seed", "21", "--accounts", "30", "--events", "2000", "--history-days", "60",
    "--repo-accounts", "30", "--repo-records", "300", "--slow-host", "100",
)  # fmt: skip
# Slow enough to be killed three times while in flight (batches of 50 records, 100 ms apart).
SLOW_BACKFILL = {
    "BACKFILL_DAYS": "30",
    "BACKFILL_PROFILE": "aggressive",
    "BACKFILL_BATCH_SIZE": "50",
    "BACKFILL_BATCH_DELAY_MS": "100",
    "BACKFILL_MAX_CONCURRENT": "3",
}


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryDevnet]:
    net = HistoryDevnet.start(tmp_path_factory.mktemp("devnet"), *HISTORY_FLAGS)
    yield net
    net.stop()


def last_processed(log: str) -> int:
    found = processed_counts(log)
    return found[-1] if found else 0


async def test_kill9_three_times_resumes_and_never_refetches_done_repos(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """The worker is killed (SIGKILL) three times at random moments after the job made
    progress; each restart resumes the job, and a repo that was `done` before a kill is
    never requested again (its getRepo count on the devnet does not move)."""
    rng = random.Random(3)
    env = dict(SLOW_BACKFILL)
    kills: list[tuple[set[str], dict[str, int]]] = []
    interrupted = 0  # repos in flight when a kill struck
    stuck = 0  # repos the last kill left in flight: the next run must take them back at once
    for _ in range(3):
        worker = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=env)
        recovers = stuck > 0
        try:
            # Progress in this run: at least one more repo done than at its start.
            before = {d for d, r in (await repo_rows(db_dsn)).items() if r["state"] == "done"}
            for _ in range(300):
                rows = await repo_rows(db_dsn)
                done = {d for d, r in rows.items() if r["state"] == "done"}
                if len(done) > len(before):
                    break
                assert worker.alive(), worker.log()[-3000:]
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.1, 1.0))
        finally:
            worker.kill9()
        # A run that made progress has passed its start-up, where it takes back the leases of
        # the killed run: logged only when that run had repos in flight, which depends on
        # when the kill struck (none in flight: nothing to recover, no line).
        if recovers:
            assert "Recovered" in worker.log(), worker.log()[-3000:]
        rows = await repo_rows(db_dsn)
        done = {d for d, r in rows.items() if r["state"] == "done"}
        assert done, "no progress before the kill"
        assert len(done) < len(rows), "the backfill finished before the kill: make it slower"
        kills.append((done, get_repo_counts(devnet.stats())))
        stuck = sum(r["state"] == "in_progress" for r in rows.values())
        interrupted += stuck

    worker = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=env)
    try:
        await wait_job(db_dsn, timeout_s=60, procs=(worker,))
        assert worker.terminate() == 0
    finally:
        worker.terminate()
    log = worker.log()
    assert "[BACKFILL] Resuming job" in log
    if stuck:
        assert "Recovered" in log  # the killed run's leases were taken back at once
    await check_window_truth(db_dsn, devnet)

    final = get_repo_counts(devnet.stats())
    for k, (done, counts) in enumerate(kills, 1):
        again = {d: final.get(d, 0) - counts.get(d, 0) for d in done}
        refetched = {d: n for d, n in again.items() if n}
        assert not refetched, f"repos done before kill {k} fetched again: {refetched}"
    # Not vacuous: the kills interrupted work at different points, at least one with repos
    # in flight, whose recovery the run after it logged (checked above).
    assert len(kills[0][0]) < len(kills[2][0])
    assert interrupted > 0


async def test_inflight_never_exceeds_max_concurrent(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """BACKFILL_MAX_CONCURRENT=3 against slow hosts (300 ms per getRepo): the devnet's
    maximum of in-flight getRepo requests is 3 (reached, never exceeded)."""
    net = HistoryDevnet.start(
        tmp_path / "devnet",
        "--seed", "22", "--accounts", "3", "--events", "30", "--repo-accounts", "24",
        "--repo-records", "20", "--slow-host", "300",
    )  # fmt: skip
    try:
        proc = BackfillProcess.start(
            tmp_path, db_dsn, net, BACKFILL_DAYS="-1", BACKFILL_PROFILE="unthrottled",
            BACKFILL_MAX_CONCURRENT="3",
        )  # fmt: skip
        assert proc.wait(60) == 0, proc.log()[-3000:]
        stats = net.stats()
    finally:
        net.stop()
    assert stats["max_inflight"] == 3, stats
    assert all(h["max_inflight"] <= 3 for h in stats["hosts"])
    assert await conn.fetchval("SELECT status FROM backfill_jobs") == "completed"
    assert sum(get_repo_counts(stats, "get_repo_ok").values()) >= 24


async def test_two_processes_share_one_job_each_repo_once(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """Two `firehose backfill run` processes on one job: both work, every repo is done
    exactly once (one complete CAR per repo in total), the tables equal the window truth."""
    before = get_repo_counts(devnet.stats())
    before_ok = get_repo_counts(devnet.stats(), "get_repo_ok")
    env = {**SLOW_BACKFILL, "BACKFILL_MAX_CONCURRENT": "4"}
    procs = [BackfillProcess.start(tmp_path, db_dsn, devnet, env=env) for _ in range(2)]
    try:
        for p in procs:
            assert p.wait(60) == 0, p.log()[-3000:]
    finally:
        for p in procs:
            p.terminate()
    await check_window_truth(db_dsn, devnet)
    rows = await repo_rows(db_dsn)
    stats = devnet.stats()
    after, after_ok = get_repo_counts(stats), get_repo_counts(stats, "get_repo_ok")
    fetched = {d: after.get(d, 0) - before.get(d, 0) for d in rows}
    complete = {d: after_ok.get(d, 0) - before_ok.get(d, 0) for d in rows}
    assert set(fetched.values()) == {1}, {d: n for d, n in fetched.items() if n != 1}
    assert set(complete.values()) == {1}, {d: n for d, n in complete.items() if n != 1}
    # Both processes took a share of the records.
    shares = [last_processed(p.log()) for p in procs]
    assert all(n > 0 for n in shares), shares
    job = await job_row(db_dsn)
    assert job is not None and sum(shares) == job["records_processed"]


def car_records(path: Path) -> tuple[str, dict[str, str]]:
    """(did, {path: cid}) of a repository CAR, read with the worker's own CAR/MST code."""
    car = read_car(path.read_bytes())
    info = read_commit(car)
    found = {key: cid_str_from_bytes(cid) for key, cid in walk_mst(info.data_cid, car.blocks.get)}
    return info.did, found


async def test_real_repository_cars_whole_history(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """BACKFILL_DAYS=-1 over the real repository CARs (served verbatim by a devnet PDS):
    every record path and CID of each CAR is in `records`."""
    flags = ["--seed", "23", "--accounts", "3", "--events", "20"]
    for car in REAL_CARS:
        flags += ["--extra-car", str(car)]
    net = HistoryDevnet.start(tmp_path / "devnet", *flags)
    try:
        proc = BackfillProcess.start(
            tmp_path, db_dsn, net, BACKFILL_DAYS="-1", BACKFILL_PROFILE="unthrottled"
        )
        assert proc.wait(60) == 0, proc.log()[-3000:]
        truth = net.truth()
    finally:
        net.stop()
    stored = {r["uri"]: r["cid"] for r in await conn.fetch("SELECT uri, cid FROM records")}
    for car, count in REAL_CARS.items():
        did, records = car_records(car)
        assert len(records) == count, car.name
        for key, cid in records.items():
            uri = f"at://{did}/{key}"
            assert stored.get(uri) == cid, (car.name, uri)
            assert truth["records"].get(uri) == cid
        state = await conn.fetchval("SELECT state FROM backfill_repos WHERE did = $1", did)
        assert state == "done"
    assert_records_equal(stored, expected_in_window(truth, None))


async def test_429_storm_pause_visible_in_status_then_completes(
    tmp_path: Path, db_dsn: str
) -> None:
    """A 429 storm on both PDS hosts: the job row that `firehose backfill status` reads goes
    paused_rate_limited at some point (every host paused), the worker logs it, the CLI
    reports the row's status until `completed`. The pause lasts about a second (the storm
    sends Retry-After: 1), shorter than one CLI start-up on a loaded machine, so the row is
    also sampled directly every 50 ms: catching it through the CLI alone was flaky in CI."""
    net = HistoryDevnet.start(
        tmp_path / "devnet",
        "--seed", "24", "--accounts", "3", "--events", "30", "--repo-accounts", "8",
        "--repo-records", "20", "--pds-hosts", "2", "--storm-429", "0.6",
    )  # fmt: skip
    seen: list[str] = []
    row_seen: set[str] = set()

    async def sample_job_row() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            while True:
                status = await conn.fetchval("SELECT status FROM backfill_jobs LIMIT 1")
                if status is not None:
                    row_seen.add(status)
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    sampler = asyncio.create_task(sample_job_row())
    try:
        proc = BackfillProcess.start(
            tmp_path, db_dsn, net, BACKFILL_DAYS="-1", BACKFILL_PROFILE="unthrottled"
        )
        try:
            for _ in range(120):
                out = await asyncio.to_thread(backfill_cli, db_dsn, "status", "--json")
                if out.returncode == 0:
                    seen.append(json.loads(out.stdout)["status"])
                    if seen[-1] == "completed":
                        break
                if not proc.alive() and seen[-1:] == ["running"]:
                    # The CLI may have read the row just before the job completed and the
                    # process exited: a dead process must not leave the job running, so
                    # read the row again now that it is dead.
                    after = await job_row(db_dsn)
                    assert after is not None and after["status"] != "running", proc.log()[-3000:]
        finally:
            proc.terminate()
        stats = net.stats()
    finally:
        sampler.cancel()
        net.stop()
    assert "paused_rate_limited" in row_seen | set(seen), (row_seen, seen)
    assert seen[-1] == "completed", seen
    assert sum(h["statuses"].get("429", 0) for h in stats["hosts"]) > 0
    job = await job_row(db_dsn)
    assert job is not None and job["repos_failed"] == 0
    assert "is paused_rate_limited" in proc.log()


# RSS may pass BACKFILL_MAX_MEMORY_MB by this much: the throttle pauses claiming and
# writing above 90 % of the limit, but work in hand (a batch being built and written, the
# decoded records of in-flight repos, allocator slack) finishes first.
MEMORY_MARGIN_MB = 50


async def test_rss_stays_under_the_memory_limit(tmp_path: Path, db_dsn: str) -> None:
    """BACKFILL_MAX_MEMORY_MB=200 with unthrottled batches (5000 records) and big repos
    (6 x 20,000 records): the worker's RSS, sampled every 50 ms with psutil, stays under
    200 MB + MEMORY_MARGIN_MB (50 MB) for the whole run, and the backfill completes."""
    net = HistoryDevnet.start(
        tmp_path / "devnet",
        "--seed", "26", "--accounts", "3", "--events", "30", "--repo-accounts", "6",
        "--repo-records", "20000",
    )  # fmt: skip
    try:
        worker = BackfillProcess.start(
            tmp_path, db_dsn, net, worker=True, BACKFILL_DAYS="-1",
            BACKFILL_PROFILE="unthrottled", BACKFILL_MAX_MEMORY_MB="200",
        )  # fmt: skip
        sampler = RssSampler(worker.pid)
        try:
            await wait_job(db_dsn, timeout_s=90, procs=(worker,))
        finally:
            peak = sampler.stop()
            worker.terminate()
        truth = net.truth()
    finally:
        net.stop()
    peak_mb = peak / 2**20
    print(f"peak RSS {peak_mb:.0f} MB over {len(sampler.samples)} samples")
    assert len(sampler.samples) > 20
    assert peak_mb < 200 + MEMORY_MARGIN_MB, f"peak RSS {peak_mb:.0f} MB"
    assert len(await records_map(db_dsn)) == len(expected_in_window(truth, None)) > 120_000
