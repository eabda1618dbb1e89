"""End to end: the unified worker (subprocess) backfills a 30-day window while the devnet's
live traffic flows, and the two paths converge: the tables hold exactly the window's
records of the backfilled repos plus everything the live stream wrote, no record older than
the window that the live stream did not touch, and no record deleted live resurrected by a
snapshot taken before the delete."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import pytest
from backfill_support import (
    BackfillProcess,
    HistoryDevnet,
    LiveOps,
    assert_converged_with_live,
    first_repo_done,
    repo_rows,
    wait_job,
    wait_until,
)
from support import wait_for_cursor

pytestmark = pytest.mark.slow

HISTORY_EVENTS = 300  # seq 1..300: 60 days of history; seq 301.. live, paced
EVENTS = 5300
# events/s: about 40 s of live traffic after the history. The backfill must take its first
# snapshots while it flows: 8 s was not always enough for a worker starting on a loaded
# 2-core machine (CI), so the margin is wide and the test checks the overlap it needs.
RATE = 125


async def test_backfill_with_live_traffic_converges(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    net = HistoryDevnet.start(
        tmp_path / "devnet",
        "--seed", "25", "--accounts", "20", "--events", str(EVENTS),
        "--history-days", "60", "--history-events", str(HISTORY_EVENTS), "--rate", str(RATE),
        "--repo-accounts", "10", "--repo-records", "200", "--slow-host", "50",
        wait_generated=False,
    )  # fmt: skip
    live = LiveOps(HISTORY_EVENTS)
    follower = asyncio.create_task(live.follow(net.relay_url))
    worker = None
    try:
        await wait_until(lambda: live.head >= HISTORY_EVENTS, 30, "history phase")
        # The live path takes over at the end of the history phase (before any snapshot is
        # taken); the backfill covers the history, in batches 50 ms apart while live events
        # keep coming.
        worker = BackfillProcess.start(
            tmp_path, db_dsn, net, worker=True,
            START_CURSOR=str(HISTORY_EVENTS), BACKFILL_DAYS="30",
            BACKFILL_PROFILE="aggressive", BACKFILL_BATCH_SIZE="20",
            BACKFILL_BATCH_DELAY_MS="50", BACKFILL_MAX_CONCURRENT="3",
        )  # fmt: skip
        # The overlap this test needs: live events still flow after the first snapshot is
        # written (later checks find live rows newer than snapshots, live deletes in
        # backfilled repos). Waited for, not raced: a repo is done once it is written.
        head_at_first_snapshot = await first_repo_done(db_dsn, live, worker)
        assert head_at_first_snapshot < EVENTS, "the live traffic ended before any snapshot"
        job = await wait_job(db_dsn, timeout_s=120, procs=(worker,))
        truth = await asyncio.to_thread(net.wait_generated, 60)
        await wait_until(lambda: live.head >= truth["last_seq"], 30, "our subscriber")
        await wait_for_cursor(db_dsn, truth["last_seq"], timeout_s=30)
        assert worker.terminate() == 0
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
        if worker is not None:
            worker.terminate()
        net.stop()

    rows = await repo_rows(db_dsn)
    done = {d for d, r in rows.items() if r["state"] == "done"}
    assert len(done) >= 20
    assert done & live.dids, "no backfilled repo had live events"
    await assert_converged_with_live(db_dsn, truth, job["cutoff"], done, live)
    # Not vacuous: live deletes hit backfilled repos.
    assert any(u.split("/")[2] in done for u in live.deleted)
    # Live rows written after a snapshot carry newer revs than it: both orders happened.
    newer = await conn.fetchval(
        "SELECT count(*) FROM records r JOIN backfill_repos b ON b.did = r.did"
        ' WHERE r.rev > b.rev COLLATE "C"'
    )
    assert newer > 0
