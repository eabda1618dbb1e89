"""BackfillService end to end against a real PostgreSQL and a fake network injected into it:
completion, records in the window, throttles (concurrency, memory, idle, batches), log
lines, stop/resume, two services on one job, retries, rate limits, dry run, summary."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from backfill_support import WholeSnapshot, wait_until
from prometheus_client import CollectorRegistry

from backfill.download import SkippedRecord
from backfill.service import BackfillService, LivePressure, should_run
from backfill.settings import BackfillSettings
from firehose.model import SnapshotRecord
from firehose.protocol.syntax import make_tid
from firehose.storage.prepare import ApplyStats, PreparedRows

CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
NOW = datetime.now(UTC)
FAST = BackfillSettings(days=30, batch_size=50, batch_delay_ms=0, max_concurrent=4, use_idle=False)


def did(i: int) -> str:
    return f"did:plc:{i:024d}"


def tid(t: datetime, clock: int = 0) -> str:
    return make_tid(int(t.timestamp() * 1_000_000), clock)


@dataclass
class Ref:
    did: str
    active: bool = True
    rev: str | None = None


@dataclass
class Page:
    repos: list[Ref]
    cursor: str | None
    invalid: int = 0


@dataclass
class Snap(WholeSnapshot):
    did: str
    rev: str
    data_cid: str
    bytes_downloaded: int
    records: list[tuple[str, str]]  # (collection, rkey)
    closed: bool = False

    def items(self, window: Any) -> Iterator[SnapshotRecord | SkippedRecord]:
        for collection, rkey in self.records:
            if not window.keeps(rkey, None):
                yield SkippedRecord("window", collection, rkey)
                continue
            record = {"$type": collection, "createdAt": "2026-01-01T00:00:00Z", "text": "hi"}
            yield (collection, rkey, self.rev, CID, record, False)

    def close(self) -> None:
        self.closed = True


class FetchFailure(Exception):
    def __init__(self, reason: str, *, transient: bool, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry_after_s = retry_after_s


@dataclass
class FakeNetwork:
    """`repos` dids, each with `per_repo` records: half in the window, half 60 days old."""

    n_repos: int = 20
    per_repo: int = 10
    page_size: int = 7
    fetch_delay_s: float = 0.01
    list_delay_s: float = 0.0
    inactive: set[str] = field(default_factory=set)
    failures: dict[str, list[Exception]] = field(default_factory=dict)
    rate_limit_pauses: int = 0
    paused: dict[str, float] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    fetches: Counter[str] = field(default_factory=Counter)
    done_fetches: Counter[str] = field(default_factory=Counter)

    def all_dids(self) -> list[str]:
        return [did(i) for i in range(self.n_repos)]

    async def list_repos(self, cursor: str | None, limit: int) -> Page:
        await asyncio.sleep(self.list_delay_s)
        start = int(cursor or 0)
        chunk = self.all_dids()[start : start + self.page_size]
        end = start + len(chunk)
        return Page(
            [Ref(d, d not in self.inactive) for d in chunk],
            str(end) if end < self.n_repos else None,
        )

    async def fetch(self, d: str, **_window: Any) -> Snap:
        self.fetches[d] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.fetch_delay_s)
            queued = self.failures.get(d)
            if queued:
                raise queued.pop(0)
        finally:
            self.in_flight -= 1
        self.done_fetches[d] += 1
        return self.snapshot(d)

    def snapshot(self, d: str) -> Snap:
        recent, old = NOW - timedelta(days=1), NOW - timedelta(days=60)
        records = [
            (
                "app.bsky.feed.post" if k % 2 else "app.bsky.feed.like",
                tid(old if k % 2 else recent, k),
            )
            for k in range(self.per_repo)
        ]
        return Snap(d, tid(NOW, 1), CID, 1000, records)

    def paused_hosts(self) -> dict[str, float]:
        return dict(self.paused)

    def known_hosts(self) -> set[str]:
        return {"pds1:443", "pds2:443"}


@contextlib.asynccontextmanager
async def service_pool(dsn: str, size: int = 6) -> Any:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=size)
    try:
        yield pool
    finally:
        await pool.close()


def make(settings: BackfillSettings, pool: Any, net: FakeNetwork, **kw: Any) -> BackfillService:
    return BackfillService(
        settings, pool, CollectorRegistry(), relay_url="ws://127.0.0.1:1",
        worker_id=kw.pop("worker_id", 0), live_pressure=kw.pop("live_pressure", None),
        network=net, **kw,
    )  # fmt: skip


async def run_to_end(service: BackfillService, timeout_s: float = 30) -> None:
    await asyncio.wait_for(service.run(asyncio.Event()), timeout_s)


async def test_backfill_completes_with_window_and_counters(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    net = FakeNetwork(inactive={did(3)})
    async with service_pool(db_dsn) as pool:
        service = make(FAST, pool, net)
        await run_to_end(service)
    assert service.status()["state"] == "completed"
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["status"] == "completed" and job["enumeration_done"]
    assert (job["repos_total"], job["repos_done"], job["repos_failed"]) == (19, 19, 0)
    assert (job["records_received"], job["records_processed"], job["records_skipped"]) == (
        190,
        95,
        95,
    )
    assert job["bytes_downloaded"] == 19 * 1000
    assert await conn.fetchval("SELECT count(*) FROM records") == 95
    assert (
        await conn.fetchval("SELECT count(*) FROM records WHERE uri LIKE $1", f"at://{did(3)}/%")
        == 0
    )
    assert await conn.fetchval("SELECT count(DISTINCT rev) FROM records") == 1
    heads = await conn.fetch("SELECT did, rev, data_cid FROM actors")
    assert len(heads) == 19 and all(h["data_cid"] == CID for h in heads)
    summary = job["summary"]
    assert '"repos_done": 19' in summary and '"records_processed": 95' in summary
    assert set(net.fetches.values()) == {1}
    cursor = await conn.fetchrow("SELECT * FROM firehose_cursor WHERE service = 'backfill'")
    assert cursor["cursor"] == 3  # listRepos pages (20 repos, 7 per page)


async def test_log_lines_exactly_as_the_guide(
    db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    guide = BackfillSettings(days=30)
    async with service_pool(db_dsn) as pool:
        service = make(guide, pool, FakeNetwork(n_repos=0), rss_reader=lambda: 245 * 1024 * 1024)
        await run_to_end(service)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "[BACKFILL] Starting 30-day historical backfill on primary worker..."
    assert messages[1] == (
        "[BACKFILL] Resource throttling config:\n"
        "  - Batch size: 5 events\n"
        "  - Batch delay: 2000ms\n"
        "  - Max concurrent: 2\n"
        "  - Memory limit: 512MB\n"
        "  - Idle processing: True"
    )
    progress = [m for m in messages if m.startswith("[BACKFILL] Progress: ")]
    assert progress and progress[-1].startswith(
        "[BACKFILL] Progress: 0 received, 0 processed, 0 skipped ("
    )
    assert progress[-1].endswith(" evt/s)")
    assert "[BACKFILL] Memory: 245MB / 512MB limit" in messages


def test_progress_and_start_line_formats() -> None:
    from backfill.progress import memory_line, progress_line, start_line

    assert progress_line(10000, 9500, 500, 250.0) == (
        "[BACKFILL] Progress: 10000 received, 9500 processed, 500 skipped (250 evt/s)"
    )
    assert memory_line(245 * 1024 * 1024, 512) == "[BACKFILL] Memory: 245MB / 512MB limit"
    assert start_line(-1, 0) == "[BACKFILL] Starting full-history backfill on primary worker..."
    assert start_line(7, 2) == "[BACKFILL] Starting 7-day historical backfill on worker 2..."


def test_skip_and_disabled_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    assert not should_run(BackfillSettings(days=0), 0)
    assert not should_run(BackfillSettings(days=30), 1)
    assert should_run(BackfillSettings(days=30, on_all_workers=True), 1)
    assert should_run(BackfillSettings(days=-1), 0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "[BACKFILL] Backfill disabled (BACKFILL_DAYS=0)"
    assert messages[1].startswith(
        "[BACKFILL] Skipping backfill on worker 1: it runs only on the primary worker"
    )


async def test_concurrency_never_exceeds_the_limit(db_dsn: str) -> None:
    net = FakeNetwork(n_repos=30, fetch_delay_s=0.03)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(replace(FAST, max_concurrent=3), pool, net))
    assert net.max_in_flight == 3
    assert sum(net.done_fetches.values()) == 30


async def test_an_idle_dispatcher_claims_when_a_page_is_queued(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each listRepos page comes late, so the dispatcher finds the queue empty first; with
    its polls an hour apart, only the enumeration's wake-up (Context.queued) and its own
    repos ending can move it on: the job still completes."""
    monkeypatch.setattr("backfill.dispatch.DISPATCH_IDLE_MIN_S", 3600.0)
    monkeypatch.setattr("backfill.dispatch.DISPATCH_POLL_S", 3600.0)
    net = FakeNetwork(n_repos=20, page_size=7, list_delay_s=0.2)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(FAST, pool, net))
    assert sum(net.done_fetches.values()) == 20


async def test_batches_and_delay(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from firehose.storage import snapshots

    sizes: list[int] = []
    times: list[float] = []
    real = snapshots.write_rows

    async def spy(c: Any, rows: PreparedRows, stats: ApplyStats, **kwargs: Any) -> Any:
        sizes.append(len(rows.records))
        times.append(time.monotonic())
        return await real(c, rows, stats, **kwargs)

    monkeypatch.setattr("backfill.repo_task.write_rows", spy)
    net = FakeNetwork(n_repos=1, per_repo=14)  # 7 in the window
    settings = replace(FAST, batch_size=3, batch_delay_ms=150, max_concurrent=1)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(settings, pool, net))
    assert sizes == [3, 3, 1]  # the last one carries the repo head
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.14 for g in gaps), gaps
    assert await conn.fetchval("SELECT count(*) FROM records") == 7


async def test_a_repo_with_a_head_is_written_guarded_from_its_first_batch(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim says which repos have a head (a live commit wrote it): their snapshots skip
    the unguarded attempt (maybe_fresh=False) and still land; the others load unguarded."""
    from firehose.storage import snapshots
    from firehose.storage.fresh import Loads

    real = snapshots.write_rows
    seen: dict[str, list[bool]] = {}
    fresh: dict[str, int] = {}

    async def spy(c: Any, rows: PreparedRows, stats: ApplyStats, **kwargs: Any) -> Any:
        written = await real(c, rows, stats, **kwargs)
        d = rows.heads[0][0]
        seen.setdefault(d, []).append(kwargs["maybe_fresh"])
        fresh[d] = fresh.get(d, 0) + written.fresh
        return written

    monkeypatch.setattr("backfill.repo_task.write_rows", spy)
    # The process's memory of loads under way starts empty, as the database does: the same
    # dids and revs were loaded by earlier tests.
    monkeypatch.setattr(snapshots, "fresh_loads", Loads())
    net = FakeNetwork(n_repos=4, per_repo=6)  # 3 in the window
    headed = net.all_dids()[:2]
    await conn.execute(
        "INSERT INTO actors (did, rev) SELECT d, '2222222222222' FROM unnest($1::text[]) d", headed
    )
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(replace(FAST, batch_size=2), pool, net))
    assert seen == {d: [d not in headed] * 2 for d in net.all_dids()}
    assert fresh == {d: 0 if d in headed else 3 for d in net.all_dids()}
    assert await conn.fetchval("SELECT count(*) FROM records") == 12
    heads = await conn.fetch("SELECT did, rev FROM actors WHERE did = ANY($1::text[])", headed)
    assert {r["rev"] for r in heads} == {tid(NOW, 1)}


async def test_small_repos_finishing_together_are_written_together(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole snapshot in one batch of fewer than FRESH_COPY_MIN_RECORDS records goes
    through the process's group (firehose/storage/together.py): repos that finish while an
    earlier one is written go together, the headed ones guarded, the others loaded
    unguarded, and every repo lands once."""
    from firehose.storage import snapshots, together
    from firehose.storage.fresh import Loads

    real = together.write_snapshots
    calls: list[list[tuple[str, bool, int]]] = []

    async def spy(c: Any, together: list[Any]) -> Any:
        results = await real(c, together)
        pairs = zip(together, results, strict=True)
        calls.append([(p.head[0], p.maybe_fresh, s.fresh) for p, s in pairs])
        return results

    monkeypatch.setattr("backfill.repo_task.write_snapshots", spy)
    monkeypatch.setattr(snapshots, "fresh_loads", Loads())  # dids of earlier tests
    # Fetched together, they finish in the same turn of the event loop, before the group's
    # first statement starts: they go together.
    net = FakeNetwork(n_repos=12, per_repo=6, fetch_delay_s=0.05)  # 3 in the window
    headed = net.all_dids()[:4]
    await conn.execute(
        "INSERT INTO actors (did, rev) SELECT d, '2222222222222' FROM unnest($1::text[]) d", headed
    )
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(replace(FAST, max_concurrent=12), pool, net))
    written = {did: (fresh, n) for call in calls for did, fresh, n in call}
    assert sum(len(call) for call in calls) == 12
    assert written == {d: (d not in headed, 0 if d in headed else 3) for d in net.all_dids()}
    assert len(calls) < 12, calls
    assert await conn.fetchval("SELECT count(*) FROM records") == 36


async def test_a_hostile_repo_in_a_group_fails_only_itself(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo whose rows PostgreSQL refuses (a CHECK constraint of this test's database
    stands in for whatever limit a hostile repo meets) fails its own attempts, with its own
    error, while the repos written in the same group are done at the first attempt."""
    from firehose.storage import snapshots, together
    from firehose.storage.fresh import Loads

    real_write, real_prepare = together.write_snapshots, together.prepare_snapshot
    groups: list[list[str]] = []
    prepared: list[str] = []

    def prepare_spy(rows: Any, stats: Any, head: Any, maybe_fresh: bool = True) -> Any:
        prepared.append(head[0])  # a repo task submits right after this, without a turn
        return real_prepare(rows, stats, head, maybe_fresh)

    async def write_spy(c: Any, members: list[Any]) -> Any:
        if not groups:  # hold the first group until every other repo waits for the second
            await wait_until(lambda: len(prepared) >= 8, 30, "every repo submitted")
        groups.append([p.head[0] for p in members])
        return await real_write(c, members)

    monkeypatch.setattr("backfill.repo_task.prepare_snapshot", prepare_spy)
    monkeypatch.setattr("backfill.repo_task.write_snapshots", write_spy)
    monkeypatch.setattr(snapshots, "fresh_loads", Loads())  # dids of earlier tests
    net = FakeNetwork(n_repos=8, per_repo=6)
    bad = net.all_dids()[3]
    await conn.execute(f"ALTER TABLE records ADD CONSTRAINT hostile CHECK (did <> '{bad}')")
    settings = replace(FAST, max_concurrent=8, max_attempts=2)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(settings, pool, net))
    assert any(bad in g and len(g) > 1 for g in groups), groups  # it shared a group
    rows = {r["did"]: r for r in await conn.fetch("SELECT * FROM backfill_repos")}
    assert rows[bad]["state"] == "failed" and rows[bad]["attempts"] == 2
    assert "hostile" in rows[bad]["error"]
    others = [rows[d] for d in net.all_dids() if d != bad]
    assert [(r["state"], r["attempts"]) for r in others] == [("done", 0)] * 7
    assert await conn.fetchval("SELECT count(*) FROM records") == 7 * 3


async def test_memory_throttle_pauses_and_resumes(db_dsn: str) -> None:
    limit = 512 * 1024 * 1024
    rss = {"now": int(limit * 0.95)}
    net = FakeNetwork(n_repos=5)
    async with service_pool(db_dsn) as pool:
        service = make(FAST, pool, net, rss_reader=lambda: rss["now"])
        task = asyncio.create_task(service.run(asyncio.Event()))
        # Waits for the first fetch (polled: a fixed sleep raced the service's start-up on a
        # loaded CI machine and saw none).
        await wait_until(lambda: sum(net.fetches.values()) >= 1, 30, "a first fetch")
        # Above 90 %: one repo at a time (never a stall, never more), ...
        assert sum(net.fetches.values()) >= 1 and net.max_in_flight == 1
        rss["now"] = int(limit * 0.85)
        await asyncio.sleep(0.3)
        assert net.max_in_flight == 1  # ... still so above 80 % (hysteresis) ...
        rss["now"] = int(limit * 0.5)
        await asyncio.wait_for(task, 20)
    assert sum(net.done_fetches.values()) == 5


async def test_memory_pressure_that_never_eases_still_completes(db_dsn: str) -> None:
    """RSS stuck above the limit (Python seldom returns memory to the OS) must not stall the
    backfill: repos go one at a time and the job completes."""
    limit = 512 * 1024 * 1024
    net = FakeNetwork(n_repos=4)
    async with service_pool(db_dsn) as pool:
        service = make(FAST, pool, net, rss_reader=lambda: int(limit * 0.99))
        await asyncio.wait_for(service.run(asyncio.Event()), 20)
    assert sum(net.done_fetches.values()) == 4
    assert net.max_in_flight == 1


async def test_idle_yields_while_live_is_behind(db_dsn: str) -> None:
    pressure = {"p": LivePressure(lag_s=0.0, queue_depth=900, queue_max=1000)}
    net = FakeNetwork(n_repos=3)
    async with service_pool(db_dsn) as pool:
        service = make(replace(FAST, use_idle=True), pool, net, live_pressure=lambda: pressure["p"])
        task = asyncio.create_task(service.run(asyncio.Event()))
        await asyncio.sleep(0.5)
        assert sum(net.fetches.values()) == 0
        pressure["p"] = LivePressure(lag_s=120.0, queue_depth=0, queue_max=1000)
        await asyncio.sleep(0.3)
        assert sum(net.fetches.values()) == 0
        pressure["p"] = LivePressure(lag_s=1.0, queue_depth=10, queue_max=1000)
        await asyncio.wait_for(task, 20)
    assert sum(net.done_fetches.values()) == 3


async def test_transient_failures_retry_then_fail(db_dsn: str, conn: asyncpg.Connection) -> None:
    net = FakeNetwork(n_repos=3)
    net.failures[did(0)] = [FetchFailure("server_error", transient=True)]
    net.failures[did(1)] = [FetchFailure("timeout", transient=True) for _ in range(5)]
    net.failures[did(2)] = [FetchFailure("too_large", transient=False)]
    settings = replace(FAST, max_attempts=2)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(settings, pool, net))
    rows = {r["did"]: r for r in await conn.fetch("SELECT * FROM backfill_repos")}
    assert rows[did(0)]["state"] == "done" and rows[did(0)]["attempts"] == 1
    assert rows[did(1)]["state"] == "failed" and rows[did(1)]["attempts"] == 2
    assert "timeout" in rows[did(1)]["error"]
    assert rows[did(2)]["state"] == "failed" and rows[did(2)]["attempts"] == 1
    assert net.fetches[did(1)] == 2 and net.fetches[did(2)] == 1
    job = await conn.fetchrow("SELECT status, repos_done, repos_failed FROM backfill_jobs")
    assert tuple(job) == ("completed", 1, 2)


async def test_rate_limit_shows_paused_and_resumes(db_dsn: str, conn: asyncpg.Connection) -> None:
    net = FakeNetwork(n_repos=2)
    net.failures[did(0)] = [FetchFailure("rate_limited", transient=True, retry_after_s=1.0)]
    net.paused = {"pds1:443": 1.0, "pds2:443": 1.0}
    net.rate_limit_pauses = 1
    async with service_pool(db_dsn) as pool:
        task = asyncio.create_task(run_to_end(make(FAST, pool, net)))
        seen = None
        for _ in range(50):
            seen = await conn.fetchval("SELECT status FROM backfill_jobs")
            if seen == "paused_rate_limited":
                break
            await asyncio.sleep(0.05)
        assert seen == "paused_rate_limited"
        net.paused = {}
        await task
    row = await conn.fetchrow("SELECT attempts, state FROM backfill_repos WHERE did = $1", did(0))
    assert tuple(row) == (0, "done")  # a 429 is the host's state, not an attempt
    assert await conn.fetchval("SELECT status FROM backfill_jobs") == "completed"


async def test_stop_returns_promptly_and_resume_finishes(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    net = FakeNetwork(n_repos=12, fetch_delay_s=0.2)
    settings = replace(FAST, max_concurrent=2, batch_size=1, batch_delay_ms=50)
    async with service_pool(db_dsn) as pool:
        stop = asyncio.Event()
        task = asyncio.create_task(make(settings, pool, net).run(stop))
        await asyncio.sleep(1.5)
        stop.set()
        t0 = time.monotonic()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - t0 < 1.0
        state = await conn.fetchrow(
            "SELECT status, repos_done, records_received FROM backfill_jobs"
        )
        assert state["status"] == "running" and 0 < state["repos_done"] < 12
        assert (
            await conn.fetchval("SELECT count(*) FROM backfill_repos WHERE state = 'in_progress'")
            == 0
        )
        done_before = {
            r[0] for r in await conn.fetch("SELECT did FROM backfill_repos WHERE state = 'done'")
        }
        fetched_before = Counter(net.done_fetches)
        await run_to_end(make(settings, pool, net))
    for d in done_before:
        assert net.done_fetches[d] == fetched_before[d] == 1  # done is never downloaded again
    assert await conn.fetchval("SELECT count(*) FROM records") == 12 * 5
    assert await conn.fetchval("SELECT status FROM backfill_jobs") == "completed"


async def test_two_services_share_one_job(db_dsn: str, conn: asyncpg.Connection) -> None:
    net = FakeNetwork(n_repos=40, page_size=5, fetch_delay_s=0.02)
    async with service_pool(db_dsn) as pool_a, service_pool(db_dsn) as pool_b:
        a = make(FAST, pool_a, net, worker_id=0)
        b = make(replace(FAST, on_all_workers=True), pool_b, net, worker_id=1)
        await asyncio.wait_for(asyncio.gather(a.run(asyncio.Event()), b.run(asyncio.Event())), 30)
    assert sorted(net.done_fetches) == net.all_dids()
    assert set(net.fetches.values()) == {1}  # every repo downloaded exactly once
    owners = await conn.fetchval("SELECT count(*) FROM backfill_repos WHERE state = 'done'")
    assert owners == 40
    assert await conn.fetchval("SELECT count(*) FROM backfill_jobs") == 1


async def test_pause_and_resume_through_the_job_row(db_dsn: str, conn: asyncpg.Connection) -> None:
    net = FakeNetwork(n_repos=30, fetch_delay_s=0.05)
    async with service_pool(db_dsn) as pool:
        service = make(replace(FAST, max_concurrent=1), pool, net)
        task = asyncio.create_task(run_to_end(service))
        await asyncio.sleep(0.4)
        await conn.execute("UPDATE backfill_jobs SET status = 'paused'")
        await asyncio.sleep(1.5)  # noticed within CONTROL_POLL_S
        frozen = sum(net.fetches.values())
        await asyncio.sleep(0.5)
        assert sum(net.fetches.values()) == frozen < 30
        assert service.status()["state"] == "paused"
        await conn.execute("UPDATE backfill_jobs SET status = 'running'")
        await task
    assert sum(net.done_fetches.values()) == 30


async def test_priority_dids_first(db_dsn: str) -> None:
    net = FakeNetwork(n_repos=10, fetch_delay_s=0.0)
    order: list[str] = []
    real = net.fetch

    async def fetch(d: str, **window: Any) -> Snap:
        order.append(d)
        return await real(d, **window)

    net.fetch = fetch  # type: ignore[method-assign]
    settings = replace(FAST, max_concurrent=1, dids=(did(9), did(8)))
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(settings, pool, net))
    assert set(order[:2]) == {did(9), did(8)}


async def test_dry_run_writes_nothing(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    net = FakeNetwork(n_repos=5)
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(replace(FAST, dry_run=True), pool, net))
    assert sum(net.done_fetches.values()) == 5
    for table in ("records", "actors", "backfill_jobs", "backfill_repos", "firehose_cursor"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert any(
        "Dry run finished: 5 repos (0 failed), 50 records received, 25 in the window"
        in r.getMessage()
        for r in caplog.records
    )


async def test_completion_summary_and_vacuum(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    async with service_pool(db_dsn) as pool:
        await run_to_end(make(replace(FAST, vacuum=True), pool, FakeNetwork(n_repos=3)))
    messages = [r.getMessage() for r in caplog.records]
    summary = [m for m in messages if m.startswith("[BACKFILL] Completed job")]
    assert summary and '"repos_done": 3' in summary[0]
    assert any(m.startswith("[BACKFILL] VACUUM ANALYZE done: records") for m in messages)
    analyzed = await conn.fetchval(
        "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
        " FROM pg_stat_user_tables WHERE relname = 'records'"
    )
    assert analyzed
