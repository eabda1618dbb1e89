"""End to end, issue 9: a window backfill (``getRepo?since=``, dormant repos skipped,
profiles through getRecord) while live traffic writes to the repos it downloads.

The devnet's year-model accounts never get live events (they exist only through listRepos
and getRepo), so the devnet also runs firehose accounts with 60 days of history followed by
live, paced events: those repos are enumerated with a rev in the window, downloaded with
``since`` (their older half is left out) and written to live at the same time. The unified
worker (a real subprocess) runs both paths; the tables converge: the rev guard keeps the
newest state in both orders, and a record deleted live is not brought back by a window
snapshot taken before the delete.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest
from backfill_support import (
    assert_converged_with_live,
    backfill_beside_live,
    get_repo_counts,
    repo_rows,
)

from backfill.window import Window
from firehose.devnet.truth import dormant_dids

pytestmark = pytest.mark.slow

HISTORY_EVENTS = 300  # seq 1..300: 60 days of history; seq 301.. live, paced
EVENTS = 6300
# events/s: about 40 s of live traffic after the history. The overlap the test needs (live
# events after the first snapshot) is waited for, not raced, and read from the data below.
RATE = 150
FLAGS = (
    "--seed", "33", "--accounts", "20", "--events", str(EVENTS), "--rate", str(RATE),
    "--history-days", "60", "--history-events", str(HISTORY_EVENTS),
    "--history-model", "year", "--model-accounts", "40", "--slow-host", "50",
)  # fmt: skip
PROFILE_SELF = "/app.bsky.actor.profile/self"
STATUS_ERROR = re.compile(r"repo_(deactivated|takendown|suspended|not_found)\b")


async def test_window_backfill_with_live_traffic_converges(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    run = await backfill_beside_live(tmp_path, db_dsn, FLAGS, HISTORY_EVENTS, EVENTS)
    job, truth, stats, live = run.job, run.truth, run.stats, run.live

    rows = await repo_rows(db_dsn)
    done = {d for d, r in rows.items() if r["state"] == "done"}
    # The live traffic also deactivates, takes down and deletes accounts: their getRepo
    # answers say so, and such a repo is failed for that reason (and nothing else).
    other = {d: (r["state"], r["error"]) for d, r in rows.items() if d not in done}
    bad = {d: o for d, o in other.items() if o[0] != "failed" or not STATUS_ERROR.match(o[1])}
    # ~6 of the 40 model accounts are active (85% dormant) and most of the 20 firehose ones.
    assert len(done) >= 12 and not bad, (len(done), bad)
    # Live commits touched repos the window backfill downloaded; deletes among them.
    assert len(done & live.dids) >= 5, "too few backfilled repos had live events"
    assert any(u.split("/")[2] in done for u in live.deleted)
    # No dormant model repo was downloaded (dormant at the truth's end is dormant at
    # enumeration: model accounts get no live events).
    since = Window(job["cutoff"]).since
    assert since is not None
    dormant = set(dormant_dids(truth, since)) - live.dids
    fetched = get_repo_counts(stats)
    assert dormant and not dormant & fetched.keys(), sorted(dormant & fetched.keys())[:3]
    # The window downloads left the older blocks out: fewer bytes than the whole repos.
    whole = sum(truth["history"][d]["car_bytes"] for d in done if d in truth["history"])
    assert 0 < stats["methods"]["com.atproto.sync.getRepo"]["bytes"] < whole / 2

    got = await assert_converged_with_live(db_dsn, truth, job["cutoff"], done, live)
    assert sum(u.endswith(PROFILE_SELF) for u in got) >= len(done) / 2
    # Live rows written after a snapshot carry newer revs than it: the live traffic went on
    # after the backfill's downloads (it overlapped them), and both orders happened.
    newer = await conn.fetchval(
        "SELECT count(*) FROM records r JOIN backfill_repos b ON b.did = r.did"
        ' WHERE r.rev > b.rev COLLATE "C"'
    )
    assert newer > 0
