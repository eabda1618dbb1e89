"""End to end through the devnet's HTTP side (relay listRepos, PLC directory, 3 PDS hosts,
getRepo CARs) with the real network stack: the backfill's tables equal the devnet's truth
for the window, also through 429 storms and 5xx answers."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from backfill_support import run_backfill_service

from backfill.settings import PROFILES, BackfillSettings
from firehose.devnet.httpfaults import HttpFaults
from firehose.devnet.relay import DevnetConfig, DevnetRelay

pytestmark = pytest.mark.slow

SETTINGS = BackfillSettings(
    days=30,
    profile="unthrottled",
    batch_size=500,
    batch_delay_ms=0,
    max_concurrent=4,
    max_memory_mb=PROFILES["unthrottled"].max_memory_mb * 4,
    use_idle=False,
    allow_private_network=True,
)


def devnet(**kw: Any) -> DevnetRelay:
    config = DevnetConfig(
        seed=7, accounts=40, events=3000, history_days=60, history_events=3000, pds_hosts=3, **kw
    )
    return DevnetRelay(config)


def expected_in_window(truth: dict[str, Any], cutoff: datetime) -> dict[str, str]:
    """Records of active accounts (inactive repos are skipped: listRepos marks them, and
    getRepo refuses them) whose time is inside the window or unknown (kept)."""
    cutoff_us = int(cutoff.timestamp() * 1_000_000)
    times = truth["record_times"]
    statuses = truth["statuses"]
    return {
        uri: cid
        for uri, cid in truth["records"].items()
        if statuses.get(uri.split("/")[2], "active") == "active"
        and (times.get(uri) is None or times[uri] >= cutoff_us)
    }


async def check_against_truth(conn: asyncpg.Connection, truth: dict[str, Any]) -> None:
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["status"] == "completed", dict(job)
    assert job["repos_failed"] == 0
    got = {r["uri"]: r["cid"] for r in await conn.fetch("SELECT uri, cid FROM records")}
    want = expected_in_window(truth, job["cutoff"])
    assert want, "the devnet produced no record in the window"
    assert len(got) == len(want)
    assert got == want


async def test_backfill_equals_truth_for_the_window(db_dsn: str, conn: asyncpg.Connection) -> None:
    async with devnet() as relay:
        await run_backfill_service(relay, db_dsn, SETTINGS)
        truth = relay.truth()
    await check_against_truth(conn, truth)
    assert await conn.fetchval("SELECT count(DISTINCT did) FROM records") > 10
    cursor = await conn.fetchval("SELECT cursor FROM firehose_cursor WHERE service = 'backfill'")
    assert cursor >= 1


async def test_429_storm_and_5xx_still_complete(db_dsn: str, conn: asyncpg.Connection) -> None:
    faults = HttpFaults.parse(storm_429=["0.2"], fail_5xx=["0.2"])
    # Each attempt fails with p ~0.2 (a seeded coin per request): with the default 5
    # attempts one of the devnet's repos fails for good in ~2% of runs, which is the attempt
    # limit working, not a fault surviving. 10 attempts: ~1e-5.
    settings = replace(SETTINGS, max_attempts=10)
    async with devnet(http_faults=faults) as relay:
        await run_backfill_service(relay, db_dsn, settings)
        truth = relay.truth()
    await check_against_truth(conn, truth)
    retried = await conn.fetchval("SELECT count(*) FROM backfill_repos WHERE attempts > 0")
    assert retried > 0  # the 5xx answers were retried
