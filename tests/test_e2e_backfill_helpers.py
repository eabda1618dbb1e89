"""End to end: one backfill in two processes (BACKFILL_PROCESSES=2, backfill/helpers.py), as
real subprocesses against the devnet's HTTP side and a real PostgreSQL: both processes
work and the tables equal the window's truth; the parent's progress line counts the
helper's records; a helper killed with -9 is started again; a parent killed with -9 takes
its helper down with it, and the next start finishes the job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from backfill_support import (
    BackfillProcess,
    HistoryDevnet,
    check_window_truth,
    get_repo_counts,
    job_row,
    processed_counts,
    repo_rows,
    wait_job,
)

from backfill.queue import owner_pid

pytestmark = pytest.mark.slow

# 30 pre-populated repos of 300 records over 60 days, every getRepo answer 100 ms late: a
# backfill of several seconds, long enough to see both processes at work and to kill one.
HISTORY_FLAGS = (
    "--seed", "23", "--accounts", "10", "--events", "500", "--history-days", "60",
    "--repo-accounts", "30", "--repo-records", "300", "--slow-host", "100",
)  # fmt: skip
TWO_PROCESSES = {
    "BACKFILL_DAYS": "30",
    "BACKFILL_PROFILE": "aggressive",
    "BACKFILL_BATCH_SIZE": "50",
    "BACKFILL_BATCH_DELAY_MS": "100",
    "BACKFILL_MAX_CONCURRENT": "4",
    "BACKFILL_PROCESSES": "2",
}
HELPER_GONE_S = 20.0


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryDevnet]:
    net = HistoryDevnet.start(tmp_path_factory.mktemp("devnet"), *HISTORY_FLAGS)
    yield net
    net.stop()


def helper_pids(parent_pid: int) -> list[int]:
    try:
        children = psutil.Process(parent_pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.cmdline()[-2:] == ["backfill", "helper"]:
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def lease_pids(dsn: str) -> set[int]:
    rows = await repo_rows(dsn)
    return {
        pid
        for r in rows.values()
        if r["state"] == "in_progress" and (pid := owner_pid(r["lease_owner"] or "")) is not None
    }


async def wait_for_helper_lease(dsn: str, proc: BackfillProcess, timeout_s: float = 60) -> int:
    """The pid of the helper once it holds a repo lease of the job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.alive(), proc.log()[-3000:]
        helpers = helper_pids(proc.pid)
        if helpers and helpers[0] in await lease_pids(dsn):
            return helpers[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no helper held a lease in {timeout_s} s:\n{proc.log()[-3000:]}")


async def test_two_processes_write_the_window_each_repo_once(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """Both processes hold repo leases; every repo is downloaded once; the tables equal the
    window's truth; the parent's last progress line counts every record of the job (its
    helper's too); no helper outlives the run."""
    before = get_repo_counts(devnet.stats())
    proc = BackfillProcess.start(tmp_path, db_dsn, devnet, env=TWO_PROCESSES)
    owners: set[int] = set()
    helpers: set[int] = set()
    try:
        while proc.alive():
            owners |= await lease_pids(db_dsn)
            helpers.update(helper_pids(proc.pid))
            await asyncio.sleep(0.05)
        assert proc.wait(60) == 0, proc.log()[-3000:]
    finally:
        proc.terminate()
    log = proc.log()
    assert "[BACKFILL] Running in 2 processes (this one and 1 helpers)" in log
    assert len(helpers) == 1, helpers  # started once, never again
    assert {proc.pid, *helpers} <= owners, (proc.pid, helpers, owners)
    job = await check_window_truth(db_dsn, devnet)
    after = get_repo_counts(devnet.stats())
    fetched = {d: after.get(d, 0) - before.get(d, 0) for d in await repo_rows(db_dsn)}
    assert set(fetched.values()) == {1}, {d: n for d, n in fetched.items() if n != 1}
    processed = processed_counts(log)
    assert processed and processed[-1] == job["records_processed"] > 0, (processed, job)
    assert all(gone(pid) for pid in helpers)


async def test_a_killed_helper_is_started_again(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    proc = BackfillProcess.start(tmp_path, db_dsn, devnet, env=TWO_PROCESSES)
    try:
        helper = await wait_for_helper_lease(db_dsn, proc)
        psutil.Process(helper).kill()
        await wait_job(db_dsn, timeout_s=90, procs=(proc,))
        assert proc.wait(60) == 0, proc.log()[-3000:]
    finally:
        proc.terminate()
    log = proc.log()
    assert "[BACKFILL] helper 1 exited with status -9; starting it again" in log
    await check_window_truth(db_dsn, devnet)


async def test_a_killed_parent_takes_its_helper_down_and_the_next_start_finishes(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """kill -9 of the process that started the helper: the helper sees its stdin end and
    stops (handing its repos back) instead of writing on alone; a new start resumes the job
    and the tables equal the window's truth."""
    proc = BackfillProcess.start(tmp_path, db_dsn, devnet, env=TWO_PROCESSES)
    try:
        helper = await wait_for_helper_lease(db_dsn, proc)
        proc.kill9()
        deadline = time.monotonic() + HELPER_GONE_S
        while not gone(helper):
            assert time.monotonic() < deadline, "the helper outlived its parent"
            await asyncio.sleep(0.1)
    finally:
        proc.terminate()
    job = await job_row(db_dsn)
    assert job is not None and job["status"] == "running", job
    # The helper handed its repos back: none is leased to it any more.
    assert helper not in await lease_pids(db_dsn)
    again = BackfillProcess.start(tmp_path, db_dsn, devnet, env=TWO_PROCESSES)
    try:
        await wait_job(db_dsn, timeout_s=90, procs=(again,))
        assert again.wait(60) == 0, again.log()[-3000:]
    finally:
        again.terminate()
    assert "[BACKFILL] Resuming job" in again.log()
    await check_window_truth(db_dsn, devnet)


async def test_the_unified_worker_stops_its_helper_and_resumes_with_it(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """Worker 0 (the live stream and the backfill in one process) with BACKFILL_PROCESSES=2:
    SIGTERM while the helper holds repos stops the worker and its helper, every repo handed
    back; the next start finishes the job with the window's truth."""
    worker = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=TWO_PROCESSES)
    try:
        helper = await wait_for_helper_lease(db_dsn, worker)
        assert worker.terminate(timeout_s=40) == 0, worker.log()[-3000:]
    finally:
        worker.terminate()
    assert gone(helper)
    assert not await lease_pids(db_dsn)  # both handed their repos back
    again = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=TWO_PROCESSES)
    try:
        await wait_for_helper_lease(db_dsn, again)
        await wait_job(db_dsn, timeout_s=90, procs=(again,))
        assert again.terminate(timeout_s=40) == 0, again.log()[-3000:]
    finally:
        again.terminate()
    log = worker.log() + again.log()
    assert "[BACKFILL] Running in 2 processes" in log
    await check_window_truth(db_dsn, devnet)
