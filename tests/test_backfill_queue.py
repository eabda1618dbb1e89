"""Jobs and the work queue against a real PostgreSQL: start rules, SKIP LOCKED claims from
two connections, leases and stuck-work recovery, retry backoff and failure."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from backfill import jobs, queries, queue
from backfill.progress import Counts

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
RELAY = "wss://relay.example"


def dids(n: int) -> list[str]:
    return [f"did:plc:{i:024d}" for i in range(n)]


async def mark_done(
    conn: asyncpg.Connection,
    job_id: int,
    did: str,
    owner: str,
    *,
    rev: str | None,
    records: int,
    bytes_: int,
    progress: Counts | None = None,
) -> bool:
    """One repo done (queue.mark_done_many); False if the lease was lost."""
    mark = queue.DoneMark(did, rev, records, bytes_)
    return did in await queue.mark_done_many(conn, job_id, owner, [mark], progress)


async def test_job_created_then_resumed_with_a_fixed_window(conn: asyncpg.Connection) -> None:
    first = await jobs.ensure_job(conn, 30, RELAY, NOW)
    assert first.action == "created"
    assert first.job.cutoff == NOW - timedelta(days=30)
    assert first.job.started_at == NOW and first.job.status == "running"
    later = await jobs.ensure_job(conn, 30, RELAY, NOW + timedelta(days=3))
    assert later.action == "resumed" and later.job.id == first.job.id
    assert later.job.cutoff == NOW - timedelta(days=30)  # fixed when created


async def test_new_days_starts_a_new_job(conn: asyncpg.Connection) -> None:
    old = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    new = await jobs.ensure_job(conn, 7, RELAY, NOW)
    assert new.action == "created" and new.job.id != old.id
    assert new.superseded is not None and new.superseded.id == old.id
    ended = await jobs.load_job(conn, old.id)
    assert ended is not None and ended.status == "failed" and "superseded" in (ended.error or "")
    whole = await jobs.ensure_job(conn, -1, RELAY, NOW)
    assert whole.job.cutoff is None and whole.job.days == -1


async def test_completed_job_is_not_redone(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await conn.execute("UPDATE backfill_jobs SET enumeration_done = true WHERE id = $1", job.id)
    done = await jobs.try_complete(conn, job.id)
    assert done is not None and done.status == "completed" and done.summary is not None
    again = await jobs.ensure_job(conn, 30, RELAY, NOW)
    assert again.action == "already_completed" and again.job.id == job.id


async def test_concurrent_start_ups_create_one_job(db_dsn: str) -> None:
    conns = [await asyncpg.connect(db_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(jobs.ensure_job(c, 30, RELAY, NOW) for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert len({r.job.id for r in results}) == 1
    assert sorted(r.action for r in results) == ["created", "resumed", "resumed", "resumed"]


async def test_enqueue_counts_new_repos_and_raises_priority(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    assert await queue.enqueue(conn, job.id, dids(5), queue.PRIORITY_ENUMERATED) == 5
    assert await queue.enqueue(conn, job.id, dids(7), queue.PRIORITY_ENUMERATED) == 2
    assert await queue.enqueue(conn, job.id, [dids(7)[6]], queue.PRIORITY_REQUESTED) == 0
    loaded = await jobs.load_job(conn, job.id)
    assert loaded is not None and loaded.repos_total == 7
    claimed = await queue.claim(conn, job.id, "a", 1, 60)
    assert [c.did for c in claimed] == [dids(7)[6]]  # priority first


async def test_two_connections_claim_every_repo_exactly_once(db_dsn: str) -> None:
    setup = await asyncpg.connect(db_dsn)
    job = (await jobs.ensure_job(setup, 30, RELAY, NOW)).job
    await queue.enqueue(setup, job.id, dids(300), 0)
    claims: dict[str, list[str]] = {"a": [], "b": []}

    async def worker(owner: str) -> None:
        c = await asyncpg.connect(db_dsn)
        try:
            while True:
                async with c.transaction():
                    got = await queue.claim(c, job.id, owner, 7, 60)
                if not got:
                    return
                for item in got:
                    claims[owner].append(item.did)
                    assert await mark_done(c, job.id, item.did, owner, rev="r", records=1, bytes_=1)
                await asyncio.sleep(0)
        finally:
            await c.close()

    await asyncio.gather(worker("a"), worker("b"))
    every = claims["a"] + claims["b"]
    assert sorted(every) == sorted(dids(300)) and len(set(every)) == 300
    assert claims["a"] and claims["b"]
    assert await queue.counts_by_state(setup, job.id) == {
        "pending": 0, "in_progress": 0, "done": 300, "failed": 0,
    }  # fmt: skip
    loaded = await jobs.load_job(setup, job.id)
    assert loaded is not None and loaded.repos_done == 300
    await setup.close()


async def test_done_is_never_claimed_again(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(1), 0)
    (c,) = await queue.claim(conn, job.id, "a", 5, 60)
    assert await mark_done(conn, job.id, c.did, "a", rev="r", records=0, bytes_=0)
    await queue.enqueue(conn, job.id, dids(1), queue.PRIORITY_REQUESTED)
    assert await queue.reclaim(conn, job.id, 5, ["a"]) == 0
    assert await queue.claim(conn, job.id, "b", 5, 60) == []


async def test_a_claim_says_which_repos_have_a_head(conn: asyncpg.Connection) -> None:
    """`headed`: the snapshot of a repo with a head skips the unguarded attempt
    (snapshots.write_snapshot's maybe_fresh); a headless actors row (an identity event) is not
    a head."""
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    absent, headless, headed = dids(3)
    await conn.execute(
        "INSERT INTO actors (did, handle, rev) VALUES ($1, 'a.test', NULL), ($2, NULL, '3kaaa')",
        headless,
        headed,
    )
    await queue.enqueue(conn, job.id, [absent, headless, headed], 0)
    claimed = await queue.claim(conn, job.id, "a", 5, 60)
    assert {c.did: c.headed for c in claimed} == {absent: False, headless: False, headed: True}


async def test_lost_lease_cannot_finish(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(1), 0)
    (c,) = await queue.claim(conn, job.id, "a", 5, 60)
    assert not await mark_done(conn, job.id, c.did, "b", rev="r", records=0, bytes_=0)
    assert not await queue.mark_failed(conn, job.id, c.did, "b", "x")


async def test_done_saves_progress_and_touches_the_cursor_in_one_statement(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("SET synchronous_commit = on")  # the test server may run with it off
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(2), 0)
    first, second = await queue.claim(conn, job.id, "a", 5, 60)
    await conn.execute(
        "INSERT INTO firehose_cursor (service, updated_at) VALUES ('backfill', $1)"
        " ON CONFLICT (service) DO UPDATE SET updated_at = EXCLUDED.updated_at",
        NOW - timedelta(days=400),
    )
    done = await mark_done(
        conn, job.id, first.did, "a", rev="r", records=4, bytes_=100,
        progress=Counts(received=5, processed=4, skipped=1, bytes=100),
    )  # fmt: skip
    assert done
    # A lost lease finishes nothing, but the records were written: their counts are saved.
    lost = await mark_done(
        conn, job.id, second.did, "b", rev="r", records=2, bytes_=10,
        progress=Counts(received=2, processed=2, skipped=0, bytes=10),
    )  # fmt: skip
    assert not lost
    row = await conn.fetchrow("SELECT * FROM backfill_jobs WHERE id = $1", job.id)
    assert (row["repos_done"], row["records_received"], row["records_processed"]) == (1, 7, 6)
    assert (row["records_skipped"], row["bytes_downloaded"]) == (1, 110)
    touched = await conn.fetchval(
        "SELECT updated_at FROM firehose_cursor WHERE service = 'backfill'"
    )
    assert touched > NOW - timedelta(days=1)
    # Inside a caller's transaction the caller's commit stays synchronous.
    async with conn.transaction():
        await mark_done(conn, job.id, second.did, "a", rev="r", records=2, bytes_=10)
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    assert await queue.counts_by_state(conn, job.id) == {
        "pending": 0, "in_progress": 0, "done": 2, "failed": 0,
    }  # fmt: skip
    # On its own the statement commits asynchronously (set for its implicit transaction).
    sync = await conn.fetchval(
        queries.REPO_DONE, job.id, queue.done_rows([queue.DoneMark("did:plc:none", None, 0, 0)]),
        "a", 0, 0, 0, 0, True,
        column=1,
    )  # fmt: skip
    assert sync == "off"
    assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_expired_lease_is_reclaimed(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(2), 0)
    await queue.claim(conn, job.id, "dead", 1, 0.05)
    await queue.claim(conn, job.id, "alive", 1, 60)
    await asyncio.sleep(0.1)
    assert await queue.reclaim(conn, job.id, 5) == 1
    counts = await queue.counts_by_state(conn, job.id)
    assert counts["pending"] == 1 and counts["in_progress"] == 1
    (again,) = await queue.claim(conn, job.id, "new", 5, 60)
    assert again.attempts == 1  # the interrupted attempt counts


async def test_dead_owner_on_this_host_is_reclaimed_at_once(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(3), 0)
    dead = queue.owner_id(0, pid=2**22 + 12345, host="testhost")  # no such pid
    me = queue.owner_id(0, host="testhost")  # ourselves: a container restarts with our pid
    other_alive = queue.owner_id(1, pid=1, host="testhost")  # pid 1 exists, not us
    for owner in (dead, me, other_alive):
        await queue.claim(conn, job.id, owner, 1, 600)
    found = await queue.dead_owners_on_host(conn, job.id, host="testhost")
    assert sorted(found) == sorted([dead, me])
    assert await queue.reclaim(conn, job.id, 5, found) == 2


def test_backoff_schedule() -> None:
    assert [queue.backoff_s(n) for n in range(1, 7)] == [1, 2, 4, 8, 16, 32]
    assert queue.backoff_s(40) == queue.RETRY_MAX_S


async def test_retry_then_failed_after_max_attempts(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(1), 0)
    for attempt in range(1, 3):
        (c,) = await queue.claim(conn, job.id, "a", 1, 60)
        assert c.attempts == attempt - 1
        assert await queue.mark_retry(conn, job.id, c.did, "a", "boom", 0.0, counts=True)
    (c,) = await queue.claim(conn, job.id, "a", 1, 60)
    assert await queue.mark_retry(conn, job.id, c.did, "a", "later", 30.0, counts=True)
    assert await queue.claim(conn, job.id, "a", 1, 60) == []  # not due for 30 s
    await conn.execute("UPDATE backfill_repos SET next_attempt_at = now()")
    (c,) = await queue.claim(conn, job.id, "a", 1, 60)
    assert await queue.mark_failed(conn, job.id, c.did, "a", "gave up")
    row = await conn.fetchrow("SELECT state, attempts, error FROM backfill_repos")
    assert tuple(row) == ("failed", 4, "gave up")
    loaded = await jobs.load_job(conn, job.id)
    assert loaded is not None and loaded.repos_failed == 1
    assert await queue.retry_failed(conn, job.id) == 1
    loaded = await jobs.load_job(conn, job.id)
    assert loaded is not None and loaded.repos_failed == 0
    (c,) = await queue.claim(conn, job.id, "a", 1, 60)
    assert c.attempts == 0


async def test_reclaim_fails_a_repo_at_max_attempts(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(1), 0)
    await conn.execute("UPDATE backfill_repos SET attempts = 4")
    await queue.claim(conn, job.id, "dead", 1, 600)
    assert await queue.reclaim(conn, job.id, 5, ["dead"]) == 1
    assert await conn.fetchval("SELECT state FROM backfill_repos") == "failed"
    loaded = await jobs.load_job(conn, job.id)
    assert loaded is not None and loaded.repos_failed == 1


async def test_completion_waits_for_enumeration_and_work(conn: asyncpg.Connection) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await queue.enqueue(conn, job.id, dids(1), 0)
    assert await jobs.try_complete(conn, job.id) is None  # enumeration unfinished
    await conn.execute("UPDATE backfill_jobs SET enumeration_done = true")
    assert await jobs.try_complete(conn, job.id) is None  # a repo pending
    (c,) = await queue.claim(conn, job.id, "a", 1, 60)
    assert await jobs.try_complete(conn, job.id) is None  # in flight
    await queue.mark_failed(conn, job.id, c.did, "a", "x")
    done = await jobs.try_complete(conn, job.id)
    assert done is not None and done.summary is not None
    assert done.summary["repos_failed"] == 1 and done.summary["repos_total"] == 1
    # retry-failed reopens a completed job
    assert await queue.retry_failed(conn, job.id) == 1
    reopened = await jobs.load_job(conn, job.id)
    assert reopened is not None and reopened.status == "running"


@pytest.mark.parametrize("status", ["paused", "completed"])
async def test_set_status_only_from_allowed(conn: asyncpg.Connection, status: str) -> None:
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await conn.execute("UPDATE backfill_jobs SET status = $1", status)
    moved = await jobs.set_status(conn, job.id, "running", ("paused",))
    assert moved == (status == "paused")


async def _big_job(conn: asyncpg.Connection, rows: int, last_pending: int) -> int:
    """A job of `rows` repos, all done but the last `last_pending` (pending) and the one
    before them (in flight): the end of a job, when try_complete runs."""
    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await conn.execute(
        """
        INSERT INTO backfill_repos (job_id, did, state, lease_owner, lease_until)
        SELECT $1, 'did:plc:' || lpad(g::text, 24, '0'),
               CASE WHEN g > $2 - $3 THEN 'pending' WHEN g = $2 - $3 THEN 'in_progress'
                    ELSE 'done' END,
               CASE WHEN g = $2 - $3 THEN 'h:w0:1' END,
               CASE WHEN g = $2 - $3 THEN now() + interval '1 hour' END
          FROM generate_series(1, $2) AS g
        """,
        job.id,
        rows,
        last_pending,
    )
    await conn.execute("UPDATE backfill_jobs SET enumeration_done = true WHERE id = $1", job.id)
    await conn.execute("ANALYZE backfill_repos")
    return job.id


async def test_completion_check_reads_the_partial_indexes(conn: asyncpg.Connection) -> None:
    # The planner's own choice on a queue big enough for a scan to look cheap: a plain
    # EXISTS over the states was a scan of the whole queue expecting an early match, while
    # at the end of a job the repos left come last (0.36 s per call at 2 million rows).
    from backfill import queries

    job_id = await _big_job(conn, 100_000, 5)
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + queries.JOB_COMPLETE, job_id))
    assert "Seq Scan on backfill_repos" not in plan, plan
    assert "backfill_repos_claim_idx" in plan and "backfill_repos_lease_idx" in plan, plan
    # And it still answers right: not complete while a repo is pending or in flight.
    assert await jobs.try_complete(conn, job_id) is None
    await conn.execute("UPDATE backfill_repos SET state = 'done' WHERE state = 'pending'")
    assert await jobs.try_complete(conn, job_id) is None  # one still in flight
    await conn.execute("UPDATE backfill_repos SET state = 'done', lease_owner = NULL")
    done = await jobs.try_complete(conn, job_id)
    assert done is not None and done.status == "completed"


def _index_conds(plan: dict, table: str) -> list[str]:
    """The index conditions of every index scan of `table` in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    if plan.get("Index Name", "").startswith(table):
        found.append(plan.get("Index Cond", ""))
    for child in plan.get("Plans", []):
        found += _index_conds(child, table)
    return found


async def test_a_statement_about_one_claimed_repo_reads_only_that_repo(
    conn: asyncpg.Connection,
) -> None:
    # sql/008: with statistics taken while nothing was in flight (a queue just filled), the
    # planner read the done mark's row through the lease index, keyed by lease_until: every
    # entry any repo had left there since the last VACUUM, one more per repo done. Keyed by
    # the row's own key, whichever index it takes finds the one repo.
    import json

    from backfill import resync_queries

    job = (await jobs.ensure_job(conn, 30, RELAY, NOW)).job
    await conn.execute("ALTER TABLE backfill_repos SET (autovacuum_enabled = false)")
    await queue.enqueue(conn, job.id, [f"did:plc:{i:024d}" for i in range(3000)], 0)
    await conn.execute("ANALYZE backfill_repos")
    for _ in range(200):
        for c in await queue.claim(conn, job.id, "h:w0:1", 10, 600):
            await mark_done(conn, job.id, c.did, "h:w0:1", rev=None, records=0, bytes_=0)
    last = await queue.claim(conn, job.id, "h:w0:1", 3, 600)
    c, names = last[0], [x.did for x in last]
    last_marks = queue.done_rows([queue.DoneMark(d, None, 0, 0) for d in names])
    statements = [
        (queries.REPO_PROGRESS, (job.id, c.did, "h:w0:1", 1, 2, None, 600.0)),
        # Several repos done at once (backfill/done_marks.py): each found by its key too.
        (queries.REPO_DONE, (job.id, last_marks, "h:w0:1", 0, 0, 0, 0, True)),
    ]
    # Both the plan made for the values (the first runs of a prepared statement) and the one
    # made for any values (which PostgreSQL keeps once it costs no more).
    for mode in ("force_custom_plan", "force_generic_plan"):
        await conn.execute(f"SET plan_cache_mode = {mode}")  # a constant
        for sql, args in statements:
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
            (plan,) = json.loads(rows[0][0])
            conds = _index_conds(plan["Plan"], "backfill_repos")
            assert conds and all("did" in cond for cond in conds), (mode, sql, conds)
            assert plan["Plan"]["Shared Hit Blocks"] < 60, plan  # 2,000 repos done: ~100 before
    await conn.execute("RESET plan_cache_mode")
    states = await conn.fetch("SELECT state FROM backfill_repos WHERE did = ANY($1::text[])", names)
    assert [r["state"] for r in states] == ["done"] * 3

    # The resync queue's statements about one repo, the same way.
    await conn.execute(
        "INSERT INTO repo_resyncs (did, reason, state, lease_owner, lease_until)"
        " SELECT 'did:plc:' || lpad(g::text, 24, '0'), 'x', 'done', NULL, now()"
        " FROM generate_series(1, 2000) AS g"
    )
    await conn.execute(
        "INSERT INTO repo_resyncs (did, reason, state, lease_owner, lease_until)"
        " VALUES ('did:plc:r', 'x', 'in_progress', 'o', now() + interval '1 hour')"
    )
    await conn.execute("ANALYZE repo_resyncs")
    rows = await conn.fetch(
        "EXPLAIN (FORMAT JSON) " + resync_queries.RESYNC_FAIL,
        "did:plc:r", "o", "e",
    )  # fmt: skip
    conds = _index_conds(json.loads(rows[0][0])[0]["Plan"], "repo_resyncs")
    assert conds and all("did" in cond for cond in conds), conds


async def test_the_queue_is_vacuumed_by_dead_rows_not_by_its_size(conn: asyncpg.Connection) -> None:
    # sql/008 part 2: a claim reads past every claim-index entry left since the last VACUUM,
    # so autovacuum comes every 200,000 dead rows of the queue, its indexes cleaned each time,
    # not every 20 % of a 40-million-repo table.
    options = await conn.fetchval(
        "SELECT reloptions FROM pg_class WHERE relname = 'backfill_repos'"
    )
    assert set(options) == {
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=200000",
        "vacuum_index_cleanup=on",
    }
