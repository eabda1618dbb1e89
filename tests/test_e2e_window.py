"""End to end, issue 9: a window backfill over the devnet's year history model, with real
processes (the devnet, `firehose backfill run`, the unified worker) over real HTTP and a real
PostgreSQL.

* ``BACKFILL_DAYS=30``: every record of the window and none older, no dormant repo asked
  for, the bytes sent at most 1.5x the window's own blocks, every active account's profile;
* the same against PDS hosts that ignore ``since``: the same rows, still no dormant repo;
* ``WANTED_COLLECTIONS=<the model's custom NSID>``, ``BACKFILL_DAYS=-1``: that collection's
  records and nothing else, only its holders downloaded (listReposByCollection), and the
  same rows through listRepos against a relay without that method;
* ``kill -9`` twice during a window backfill: it resumes and ends equal to the truth.

Every devnet here is built with the same ``--seed`` and ``--now``, so they hold the same
accounts, records and revs; ``--now`` is the real time at import, so the job's cutoff (its
start minus 30 days) falls inside the model's year where the model expects it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from backfill_support import (
    BackfillProcess,
    HistoryDevnet,
    assert_records_equal,
    expected_in_window,
    get_repo_counts,
    job_row,
    records_map,
    repo_rows,
    wait_job,
)
from support import COLLECTION_TABLES

from backfill.window import Window
from firehose.devnet.model import MODEL_NOTE
from firehose.devnet.truth import dormant_dids, window_bytes

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
# 80 model accounts (about 64 dormant, one heavy with ~2,000 records, a handful writing the
# custom lexicon) and 2 firehose accounts whose few events are from 2025 (dormant too).
MODEL_FLAGS = (
    "--seed", "31", "--now", NOW, "--accounts", "2", "--events", "20",
    "--history-model", "year", "--model-accounts", "80",
)  # fmt: skip
# Each PDS answer waits 100 ms, so the kill test finds the job in flight.
SLOW = ("--slow-host", "100")
FAST_BACKFILL = {"BACKFILL_PROFILE": "unthrottled", "BACKFILL_MAX_CONCURRENT": "4"}
PROFILE = "app.bsky.actor.profile"
WINDOW_BYTES_FACTOR = 1.5  # issue 9: bytes downloaded <= 1.5x the window's own blocks


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryDevnet]:
    net = HistoryDevnet.start(tmp_path_factory.mktemp("devnet"), *MODEL_FLAGS, *SLOW)
    yield net
    net.stop()


def since_of(job: dict[str, Any]) -> str:
    since = Window(job["cutoff"]).since
    assert since is not None
    return since


def active_dids(truth: dict[str, Any], since: str) -> set[str]:
    """Repos served by getRepo with a commit after `since`: what a window backfill needs."""
    return set(truth["history"]) - set(dormant_dids(truth, since))


def expected_window_rows(truth: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
    """The window's records (record_times vs the job's cutoff) plus the current profile of
    every account active in the window (issue 9: fetched with getRecord when the window
    download does not carry it), whatever its createdAt."""
    active = active_dids(truth, since_of(job))
    # A repo that is not served (or dormant) gives nothing: not even its profile, whose
    # record time is None in truths that treat it as current state.
    want = {
        u: c for u, c in expected_in_window(truth, job["cutoff"]).items()
        if u.split("/")[2] in active
    }  # fmt: skip
    for did in active:
        uri = f"at://{did}/{PROFILE}/self"
        if uri in truth["records"]:
            want[uri] = truth["records"][uri]
    return want


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {d: n - before.get(d, 0) for d, n in after.items() if n - before.get(d, 0)}


def method_bytes(stats: dict[str, Any], nsid: str) -> int:
    return int(stats["methods"].get(nsid, {}).get("bytes", 0))


def served_bytes(stats: dict[str, Any]) -> int:
    """Response bytes the PDS hosts sent for getRepo and getRecord (all hosts)."""
    return sum(method_bytes(stats, f"com.atproto.sync.{m}") for m in ("getRepo", "getRecord"))


async def run_to_completion(
    tmp: Path, dsn: str, net: HistoryDevnet, **env: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`firehose backfill run` until it exits; (job row, stats before, stats after)."""
    before = net.stats()
    proc = BackfillProcess.start(tmp, dsn, net, env={**FAST_BACKFILL, **env})
    try:
        assert proc.wait(120) == 0, proc.log()[-3000:]
    finally:
        proc.terminate()
    job = await job_row(dsn)
    assert job is not None and job["status"] == "completed", job
    assert job["repos_failed"] == 0, job
    return job, before, net.stats()


async def check_window_job(
    dsn: str, truth: dict[str, Any], job: dict[str, Any], before: dict[str, Any],
    after: dict[str, Any],
) -> tuple[dict[str, str], dict[str, int]]:  # fmt: skip
    """The shared checks of a BACKFILL_DAYS=30 job; (rows, getRepo requests per did)."""
    since = since_of(job)
    dormant = set(dormant_dids(truth, since))
    got = await records_map(dsn)
    want = expected_window_rows(truth, job)
    assert_records_equal(got, want)
    # None older than the window, except the profiles the job must carry.
    cutoff_us = int(job["cutoff"].timestamp() * 1_000_000)
    times = truth["record_times"]
    old = [u for u in got if (times.get(u) or cutoff_us) < cutoff_us and "/" + PROFILE not in u]
    assert not old, old[:3]
    # Not vacuous: the window cut records off, most repos are dormant.
    assert len(want) < len(expected_in_window(truth, None)) / 2
    assert len(dormant) > len(truth["history"]) / 2
    # No dormant repo downloaded (nor its profile asked for); every active repo was.
    fetched = diff(get_repo_counts(after), get_repo_counts(before))
    records_asked = diff(
        get_repo_counts(after, "get_record"), get_repo_counts(before, "get_record")
    )
    assert not dormant & fetched.keys(), sorted(dormant & fetched.keys())[:3]
    assert not dormant & records_asked.keys()
    assert fetched.keys() == active_dids(truth, since)
    assert job["repos_skipped_dormant"] == len(dormant), job
    rows = await repo_rows(dsn)
    assert set(rows) == fetched.keys()
    assert all(r["state"] == "done" for r in rows.values())
    return got, fetched


async def test_window_backfill_downloads_only_the_window(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """BACKFILL_DAYS=30 over the year model: the window's rows, no dormant repo, the bytes
    sent (server side) at most 1.5x the bytes of the window's blocks."""
    truth = devnet.truth()
    job, before, after = await run_to_completion(tmp_path, db_dsn, devnet, BACKFILL_DAYS="30")
    await check_window_job(db_dsn, truth, job, before, after)
    since = since_of(job)
    window = window_bytes(truth, since)
    sent = served_bytes(after) - served_bytes(before)
    whole = sum(truth["history"][d]["car_bytes"] for d in active_dids(truth, since))
    print(f"window {window} B, sent {sent} B, job {job['bytes_downloaded']} B, whole {whole} B")
    assert window > 0
    # Most active accounts' profiles are older than the window: getRecord brought them.
    asked = diff(get_repo_counts(after, "get_record"), get_repo_counts(before, "get_record"))
    assert len(asked) > len(active_dids(truth, since)) / 2, asked
    assert sent <= WINDOW_BYTES_FACTOR * window, (sent, window)
    assert job["bytes_downloaded"] <= WINDOW_BYTES_FACTOR * window, (job, window)
    # The saving is real: less than the whole repos of the active accounts alone.
    assert sent < whole


async def test_pds_ignoring_since_gives_the_same_rows(db_dsn: str, tmp_path: Path) -> None:
    """PDS hosts that ignore `since` answer whole repos: the window filter gives the same
    rows, profiles come with the repo (no getRecord), and no dormant repo is asked for."""
    net = HistoryDevnet.start(tmp_path / "devnet", *MODEL_FLAGS, "--ignore-since")
    try:
        truth = net.truth()
        job, before, after = await run_to_completion(tmp_path, db_dsn, net, BACKFILL_DAYS="30")
        _, fetched = await check_window_job(db_dsn, truth, job, before, after)
    finally:
        net.stop()
    since = since_of(job)
    whole = sum(truth["history"][d]["car_bytes"] for d in fetched)
    assert method_bytes(after, "com.atproto.sync.getRepo") == whole
    assert method_bytes(after, "com.atproto.sync.getRecord") == 0
    assert whole > WINDOW_BYTES_FACTOR * window_bytes(truth, since)  # whole answers indeed


def note_rows(truth: dict[str, Any]) -> dict[str, str]:
    return {u: c for u, c in truth["records"].items() if u.split("/")[3] == MODEL_NOTE}


async def check_collection_rows(db_dsn: str, truth: dict[str, Any]) -> None:
    want = note_rows(truth)
    assert len({u.split("/")[2] for u in want}) >= 3, "too few note writers in the model"
    assert_records_equal(await records_map(db_dsn), want)
    conn = await asyncpg.connect(db_dsn)
    try:
        for table in COLLECTION_TABLES.values():
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await conn.close()


async def test_custom_collection_only_its_holders(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """WANTED_COLLECTIONS=<the model's NSID>, BACKFILL_DAYS=-1: listReposByCollection, only
    the holders downloaded, every record of the collection and nothing else."""
    truth = devnet.truth()
    job, before, after = await run_to_completion(
        tmp_path, db_dsn, devnet, BACKFILL_DAYS="-1", WANTED_COLLECTIONS=MODEL_NOTE
    )
    await check_collection_rows(db_dsn, truth)
    holders = {u.split("/")[2] for u in note_rows(truth)}
    fetched = diff(get_repo_counts(after), get_repo_counts(before))
    assert fetched.keys() == holders
    assert len(holders) < len(truth["history"]) / 4
    assert job["list_method"] == "listReposByCollection" and job["list_fallback"] is None, job


async def test_relay_without_list_repos_by_collection(db_dsn: str, tmp_path: Path) -> None:
    """The same job against a relay that answers 404 for listReposByCollection: the same
    rows, through listRepos (every active repo downloaded)."""
    net = HistoryDevnet.start(tmp_path / "devnet", *MODEL_FLAGS, "--no-list-repos-by-collection")
    try:
        truth = net.truth()
        job, _, after = await run_to_completion(
            tmp_path, db_dsn, net, BACKFILL_DAYS="-1", WANTED_COLLECTIONS=MODEL_NOTE
        )
        await check_collection_rows(db_dsn, truth)
    finally:
        net.stop()
    assert job["list_method"] == "listRepos", job
    assert job["list_fallback"], job
    assert get_repo_counts(after).keys() == set(truth["history"])  # every repo, whole


async def test_kill9_twice_during_a_window_backfill(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """The unified worker is killed (SIGKILL) twice while a window backfill is in flight;
    the third run resumes the job, which completes equal to the truth."""
    truth = devnet.truth()
    env = {
        "BACKFILL_DAYS": "30",
        "BACKFILL_PROFILE": "aggressive",
        "BACKFILL_BATCH_SIZE": "20",
        "BACKFILL_BATCH_DELAY_MS": "100",
        "BACKFILL_MAX_CONCURRENT": "2",
    }
    rng = random.Random(9)
    before = devnet.stats()
    done_at_kill: list[int] = []
    for _ in range(2):
        worker = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=env)
        try:
            start = sum(r["state"] == "done" for r in (await repo_rows(db_dsn)).values())
            for _ in range(600):  # poll: one more repo done in this run
                rows = await repo_rows(db_dsn)
                if sum(r["state"] == "done" for r in rows.values()) > start:
                    break
                assert worker.alive(), worker.log()[-3000:]
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.05, 0.5))
        finally:
            worker.kill9()
        rows = await repo_rows(db_dsn)
        done = sum(r["state"] == "done" for r in rows.values())
        job = await job_row(db_dsn)
        assert job is not None and job["status"] != "completed", "finished before the kill"
        done_at_kill.append(done)
    worker = BackfillProcess.start(tmp_path, db_dsn, devnet, worker=True, env=env)
    try:
        job = await wait_job(db_dsn, timeout_s=120, procs=(worker,))
        assert worker.terminate() == 0
    finally:
        worker.terminate()
    assert "[BACKFILL] Resuming job" in worker.log()
    assert 0 < done_at_kill[0] <= done_at_kill[1]
    await check_window_job(db_dsn, truth, job, before, devnet.stats())
