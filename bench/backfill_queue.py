"""Queue benchmark: what claiming a repo and marking it done cost as a backfill job goes on.

A job of REPOS pending repos (`backfill_repos`) in a fresh embedded PostgreSQL, then, on one
connection, the backfill's own queue calls (backfill/queue.py): a claim of CLAIM repos, each
then marked done, until FRACTION of the queue is done. Every tenth of the way it prints the
PostgreSQL CPU (the connection's backend) and this process's CPU per repo for that stretch,
and the buffers the claim's and the done mark's plans read (EXPLAIN (ANALYZE, BUFFERS) of
one more of each). A statement whose cost grows with the repos done shows as a rising line:
on the real network a job holds ~40 million repos. `--done-together N` marks the claimed
repos done N to a statement (queue.mark_done_many, as backfill/done_marks.py does when repos
finish together; default 1, one statement per repo). `--no-autovacuum` turns autovacuum off on
the queue, which shows what piles up between two of its runs (sql/008_queue_at_scale.sql).
Prints one JSON line {"bench": "queue", ...} at the end. (Not bench/queue.py: a script's
folder comes first on sys.path, and that name would hide the standard library's `queue` from
every benchmark here.)

    python bench/backfill_queue.py [--repos 200000] [--claim 10] [--fraction 0.5]
                                   [--done-together 1] [--no-autovacuum]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backfill import jobs, queries, queue
from bench.common import MachineLoad, cpu_s, load_at_start
from firehose.storage.embedded import start_embedded
from firehose.storage.migrate import migrate

OWNER = "bench:w0:1"
LEASE_S = 600.0
ENQUEUE_CHUNK_REPOS = 10_000
STRETCHES = 10


async def _buffers(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """Shared buffers one run of `sql` reads (EXPLAIN ANALYZE: it runs)."""
    rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
    plan = json.loads(rows[0][0])[0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def run(
    repos: int, claim_size: int, fraction: float, autovacuum: bool, done_together: int = 1
) -> dict[str, Any]:
    load_at_start()
    with tempfile.TemporaryDirectory() as tmp:
        pg = start_embedded(Path(tmp) / "pg")
        conn = await asyncpg.connect(pg.dsn)
        try:
            return await _measure(conn, repos, claim_size, fraction, autovacuum, done_together)
        finally:
            await conn.close()
            pg.stop()


async def _measure(
    conn: asyncpg.Connection,
    repos: int,
    claim_size: int,
    fraction: float,
    autovacuum: bool,
    done_together: int = 1,
) -> dict[str, Any]:
    await migrate(conn)
    if not autovacuum:
        await conn.execute("ALTER TABLE backfill_repos SET (autovacuum_enabled = false)")
    job = (await jobs.ensure_job(conn, -1, "wss://relay.bench", datetime.now(UTC))).job
    dids = [f"did:plc:{i:024x}" for i in range(repos)]
    for i in range(0, repos, ENQUEUE_CHUNK_REPOS):
        await queue.enqueue(conn, job.id, dids[i : i + ENQUEUE_CHUNK_REPOS], 0)
    # The statistics a real job's queue has: taken while it fills, when almost nothing is in
    # flight (autoanalyze; done here, as autovacuum may be off).
    await conn.execute("ANALYZE backfill_repos")
    backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
    me = psutil.Process()
    target = int(repos * fraction)
    stretch = max(1, target // STRETCHES)
    load = MachineLoad()
    pg0, me0, t0 = cpu_s([backend]), cpu_s([me]), time.monotonic()
    rows: list[dict[str, Any]] = []
    done = 0
    while done < target:
        s_pg, s_me, s_done = cpu_s([backend]), cpu_s([me]), done
        while done - s_done < stretch and done < target:
            claimed = await queue.claim(conn, job.id, OWNER, claim_size, LEASE_S)
            if not claimed:
                break
            for i in range(0, len(claimed), done_together):
                marks = [queue.DoneMark(c.did, None, 0, 0) for c in claimed[i : i + done_together]]
                await queue.mark_done_many(conn, job.id, OWNER, marks)
            done += len(claimed)
        n = max(1, done - s_done)
        row = {
            "done": done,
            "pg_us_per_repo": round((cpu_s([backend]) - s_pg) / n * 1e6),
            "bench_us_per_repo": round((cpu_s([me]) - s_me) / n * 1e6),
        }
        (c,) = await queue.claim(conn, job.id, OWNER, 1, LEASE_S) or [None]
        if c is not None:  # one more claim and done mark, explained
            row["claim_buffers"] = await _buffers(
                conn, queries.REPOS_CLAIM, job.id, OWNER, claim_size, LEASE_S
            )
            row["done_buffers"] = await _buffers(
                conn,
                queries.REPO_DONE,
                job.id,
                queue.done_rows([queue.DoneMark(c.did, None, 0, 0)]),
                OWNER,
                0,
                0,
                0,
                0,
                True,
            )
            done += 1
            await conn.execute(
                "UPDATE backfill_repos SET state = 'pending', lease_owner = NULL"
                " WHERE job_id = $1 AND state = 'in_progress'",
                job.id,
            )  # the explained claim's repos go back
        rows.append(row)
        print(
            f"{done:>10,} done: PostgreSQL {row['pg_us_per_repo']} µs, this process "
            f"{row['bench_us_per_repo']} µs per repo (claims of {claim_size}, done "
            f"{done_together} to a statement); buffers read by a claim {row.get('claim_buffers')}, "
            f"by a done mark {row.get('done_buffers')}",
            flush=True,
        )
    own = (cpu_s([backend]) - pg0) + (cpu_s([me]) - me0)
    load.stop(own)
    elapsed = time.monotonic() - t0
    print(load.describe())
    return {
        "bench": "queue",
        "repos": repos,
        "claim": claim_size,
        "autovacuum": autovacuum,
        "done_together": done_together,
        "done": done,
        "elapsed_s": round(elapsed, 2),
        "stretches": rows,
        **load.fields(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repos", type=int, default=200_000)
    ap.add_argument("--claim", type=int, default=10, help="repos per claim")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the queue to work")
    ap.add_argument("--no-autovacuum", action="store_true", help="autovacuum off on the queue")
    ap.add_argument("--done-together", type=int, default=1, help="repos per done statement")
    args = ap.parse_args()
    result = asyncio.run(
        run(args.repos, args.claim, args.fraction, not args.no_autovacuum, args.done_together)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
