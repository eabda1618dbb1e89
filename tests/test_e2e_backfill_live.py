"""End to end: the unified worker (subprocess) backfills a 30-day window while the devnet's
live traffic flows, and the two paths converge: the tables hold exactly the window's
records of the backfilled repos plus everything the live stream wrote, no record older than
the window that the live stream did not touch, and no record deleted live resurrected by a
snapshot taken before the delete."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from backfill_support import (
    assert_converged_with_live,
    backfill_beside_live,
    repo_rows,
)

pytestmark = pytest.mark.slow

HISTORY_EVENTS = 300  # seq 1..300: 60 days of history; seq 301.. live, paced
EVENTS = 5300
# events/s: about 40 s of live traffic after the history. The backfill must take its first
# snapshots while it flows: 8 s was not always enough for a worker starting on a loaded
# 2-core machine (CI), so the margin is wide and the test checks the overlap it needs.
RATE = 125
FLAGS = (
    "--seed", "25", "--accounts", "20", "--events", str(EVENTS),
    "--history-days", "60", "--history-events", str(HISTORY_EVENTS), "--rate", str(RATE),
    "--repo-accounts", "10", "--repo-records", "200", "--slow-host", "50",
)  # fmt: skip


async def test_backfill_with_live_traffic_converges(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    run = await backfill_beside_live(tmp_path, db_dsn, FLAGS, HISTORY_EVENTS, EVENTS)
    job, truth, live = run.job, run.truth, run.live

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
