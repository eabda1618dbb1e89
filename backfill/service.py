"""BackfillService: the history of the last BACKFILL_DAYS days, next to the live stream.

`run(stop)` reads like a table of contents: announce, open the job, recover stuck work,
queue the priority repos, then three loops until the job completes or `stop` is set —
enumerate repos, dispatch them to throttled repo tasks, and a control loop (pause/resume
from the job row, rate-limit state, lease renewal, stuck-work recovery, metrics, progress
lines). On completion: the summary (log + job row) and, with BACKFILL_VACUUM=true, VACUUM
ANALYZE. On stop: in-flight repos are handed back and counters saved, promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from backfill import jobs, queue
from backfill.context import Context
from backfill.dispatch import dispatch, wait_any
from backfill.enumeration import enumerate_until_done
from backfill.handles import HandleMetrics, verify_handles
from backfill.helpers import Helpers, plan_helpers
from backfill.jobs import Job
from backfill.metrics import BackfillMetrics
from backfill.network import Network, open_http_network
from backfill.progress import Counts, Progress, config_lines, start_line
from backfill.repo_task import save_progress
from backfill.settings import BackfillSettings
from backfill.status import job_status
from backfill.throttle import LivePressure, Throttle, process_rss_bytes
from firehose.storage.database import QUERY_RETRY_ERRORS, TRANSIENT_DB_ERRORS

__all__ = ["BackfillService", "LivePressure", "should_run"]

log = logging.getLogger("backfill")

# A repo whose worker died or stalled under it (kill -9, a deploy, an OOM kill caused by other
# work) is usually not at fault, and a slow repo is in flight through many such deaths: it
# fails only after this many times BACKFILL_MAX_ATTEMPTS interrupted attempts, which still
# stops a repo that takes its worker down every time from looping for ever. (With the plain
# limit, 20 random kills of a slow backfill failed a healthy repo: tests/test_e2e_faults.py.)
INTERRUPTED_ATTEMPTS_FACTOR = 4

CONTROL_POLL_S = 1.0  # pause/resume from the CLI are noticed within this
RECLAIM_EVERY_S = 15.0  # stuck-work recovery while running
DB_RETRY_MIN_S = 1.0  # a database outage: first wait before starting again
DB_RETRY_MAX_S = 30.0


def should_run(settings: BackfillSettings, worker_id: int) -> bool:
    """The start rule, with its log line when the backfill does not run here."""
    if not settings.enabled:
        log.info("[BACKFILL] Backfill disabled (BACKFILL_DAYS=0)")
        return False
    if worker_id != 0 and not settings.on_all_workers:
        log.info(
            "[BACKFILL] Skipping backfill on worker %d: it runs only on the primary worker "
            "(WORKER_ID=0); set BACKFILL_ON_ALL_WORKERS=true to let this worker help",
            worker_id,
        )
        return False
    return True


class BackfillService:
    def __init__(
        self,
        settings: BackfillSettings,
        pool: asyncpg.Pool,
        registry: CollectorRegistry,
        *,
        relay_url: str,
        worker_id: int,
        live_pressure: Callable[[], LivePressure] | None,
        network: Network | None = None,
        rss_reader: Callable[[], int] = process_rss_bytes,
        wanted_collections: tuple[str, ...] = (),
        lease_s: float | None = None,
        dsn: str | None = None,
        join_job: int | None = None,
    ) -> None:
        """`dsn`: the database's, for helper processes (BACKFILL_PROCESSES > 1; none
        without it). `join_job`: this service is a helper (backfill/helpers.py) of the
        process running that job: it joins only that job while it is active, logs no start
        or progress lines, and never completes the job."""
        self.settings = settings
        # This process's part of the limits (all of them with BACKFILL_PROCESSES=1).
        self.own = own = settings.process_share(0)
        self.pool = pool
        self.metrics = BackfillMetrics.create(registry)
        self.handle_metrics = HandleMetrics.create(registry)
        self.relay_url = relay_url
        self.worker_id = worker_id
        self.throttle = Throttle(
            max_memory_mb=own.max_memory_mb,
            use_idle=settings.use_idle,
            rss_reader=rss_reader,
            live_pressure=live_pressure,
        )
        self.throttle.on_change = self.metrics.set_throttle
        self.progress = Progress()
        self._network = network
        self._wanted = wanted_collections
        self._lease_s = lease_s
        self._dsn = dsn
        self._live_pressure = live_pressure
        self._join_job = join_job
        self.helpers: Helpers | None = None
        self._completed: Job | None = None  # the job this run completed
        self._ctx: Context | None = None
        self._status: dict[str, Any] = {"state": "starting"}
        self.metrics.memory_limit_bytes.set(own.max_memory_mb * 1024 * 1024)

    # -- the table of contents -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until the job completes or `stop` is set. A database outage pauses the backfill
        instead of ending it: the run unwinds, waits (capped backoff, one log line per try)
        and starts again; the job and queue rows say where it was, and `dead_owners_on_host`
        counts this process's own leases as dead at a start, so the repos that were in
        flight are taken back at once. Any other error ends it (the caller logs it)."""
        delay_s = DB_RETRY_MIN_S
        while True:
            started = time.monotonic()
            try:
                await self._run_once(stop)
                return
            except Exception as exc:
                if stop.is_set() or not is_db_outage(exc):
                    raise
                if time.monotonic() - started > DB_RETRY_MAX_S:
                    delay_s = DB_RETRY_MIN_S  # it ran fine for a while: a new outage
                self._status = {"state": "waiting_for_database"}
                log.warning(
                    "[BACKFILL] database unavailable (%s); paused, trying again in %.0f s",
                    _first_leaf(exc),
                    delay_s,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
                if stop.is_set():
                    return
                delay_s = min(delay_s * 2, DB_RETRY_MAX_S)

    async def _run_once(self, stop: asyncio.Event) -> None:
        if self.settings.dry_run:
            from backfill.dryrun import dry_run

            async with self._open_network() as net:
                await dry_run(self.settings, net, stop, log_start=self._announce)
            return
        self._announce()
        async with self._open_network() as net:
            job = await self._open_job()
            if job is None:
                return
            ctx = self._context(job, net)
            self.helpers = self._helpers(ctx)
            await self._recover_stuck_work(ctx, at_start=True)
            await self._queue_priority_repos(ctx)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._watch_stop(ctx, stop))
                    # First, so it listens before the first DID is resolved.
                    tg.create_task(verify_handles(ctx, self.handle_metrics, stop))
                    tg.create_task(self._control(ctx))
                    tg.create_task(enumerate_until_done(ctx))
                    tg.create_task(dispatch(ctx, self.own.max_concurrent, self._try_complete))
                    if self.helpers is not None:
                        tg.create_task(self.helpers.run(ctx.halt))
            finally:
                await self._save_on_exit(ctx)
            if self._completed is not None:
                # After the helpers stopped: their last counts are in the progress line.
                await self._finish(ctx, self._completed)

    @property
    def helper(self) -> bool:
        """Whether this service is a helper process of another's job (`join_job`)."""
        return self._join_job is not None

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    # -- start ---------------------------------------------------------------------------

    def _announce(self) -> None:
        if self.helper:
            return
        s = self.settings
        log.info(start_line(s.days, self.worker_id))
        lines = config_lines(
            s.batch_size, s.batch_delay_ms, s.max_concurrent, s.max_memory_mb, s.use_idle
        )
        log.info("\n".join(lines))

    def _helpers(self, ctx: Context) -> Helpers | None:
        """The helper processes of this backfill (BACKFILL_PROCESSES), not started yet."""
        if self.helper or self.settings.dry_run:
            return None
        return plan_helpers(
            self.settings,
            dsn=self._dsn,
            job_id=ctx.job.id,
            pool_size=self.pool.get_max_size(),
            relay_url=self.relay_url,
            worker_id=self.worker_id,
            wanted_collections=self._wanted,
            live_pressure=self._live_pressure,
            on_counts=self._helper_counts,
        )

    def _rss_bytes(self) -> int:
        """The backfill's resident memory for the memory line, against BACKFILL_MAX_MEMORY_MB:
        this process's, and its helpers' (each held to its own part by its own throttle)."""
        own = self.throttle.rss_bytes or process_rss_bytes()
        return own + (self.helpers.rss_bytes() if self.helpers is not None else 0)

    def _helper_counts(self, delta: Counts) -> None:
        self.metrics.count_records(delta)
        self.metrics.bytes_downloaded.inc(delta.bytes)
        self.progress.add_helpers(delta)

    @contextlib.asynccontextmanager
    async def _open_network(self) -> AsyncIterator[Network]:
        if self._network is not None:
            yield self._network
            return
        async with open_http_network(
            self.settings, self.relay_url, memory_mb=self.own.max_memory_mb
        ) as net:
            yield net

    async def _open_job(self) -> Job | None:
        if self._join_job is not None:
            async with self.pool.acquire() as conn:
                job = await jobs.load_job(conn, self._join_job)
            return job if job is not None and job.active else None
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn:
            decision = await jobs.ensure_job(conn, self.settings.days, self.relay_url, now)
            job = decision.job
            if decision.superseded is not None:
                old = decision.superseded
                log.info(
                    "[BACKFILL] BACKFILL_DAYS changed from %d to %d: job %d ended, "
                    "starting a new job",
                    old.days,
                    job.days,
                    old.id,
                )
            if decision.action == "already_completed":
                log.info(
                    "[BACKFILL] Job %d (BACKFILL_DAYS=%d) already completed at %s; nothing to do",
                    job.id,
                    job.days,
                    job.completed_at,
                )
                self._status = {"state": "completed", "job_id": job.id}
                return None
            if decision.action == "created":
                from firehose.storage.writer import save_cursor

                await save_cursor(conn, "backfill", 0, None)  # a new job pages from the start
                log.info("[BACKFILL] New job %d: %s", job.id, job.describe_window())
            else:
                log.info(
                    "[BACKFILL] Resuming job %d (%s): %d/%d repos done, listRepos page %d",
                    job.id,
                    job.describe_window(),
                    job.repos_done,
                    job.repos_total,
                    job.list_pages,
                )
        return job

    def _context(self, job: Job, net: Network) -> Context:
        ctx = Context(
            settings=self.settings,
            pool=self.pool,
            network=net,
            metrics=self.metrics,
            throttle=self.throttle,
            progress=self.progress,
            job=job,
            owner=queue.owner_id(self.worker_id),
            halt=asyncio.Event(),
            # The live path must always find a pooled connection for its next commit.
            db_slots=asyncio.Semaphore(max(1, self.pool.get_max_size() - 1)),
            wanted_collections=self._wanted,
        )
        if self._lease_s is not None:
            ctx.lease_s = self._lease_s
        self._ctx = ctx
        return ctx

    async def _recover_stuck_work(self, ctx: Context, *, at_start: bool) -> None:
        async with ctx.conn() as conn:
            if at_start:
                ctx.dead_owners = await queue.dead_owners_on_host(conn, ctx.job.id)
            n = await queue.reclaim(
                conn,
                ctx.job.id,
                self.settings.max_attempts * INTERRUPTED_ATTEMPTS_FACTOR,
                ctx.dead_owners if at_start else (),
            )
        if n:
            log.info("[BACKFILL] Recovered %d stuck repo(s) from stopped or stalled workers", n)

    async def _queue_priority_repos(self, ctx: Context) -> None:
        if self.settings.dids:
            async with ctx.conn() as conn:
                await queue.enqueue(conn, ctx.job.id, self.settings.dids, queue.PRIORITY_REQUESTED)

    # -- the loops -----------------------------------------------------------------------

    async def _watch_stop(self, ctx: Context, stop: asyncio.Event) -> None:
        await wait_any(set(), (stop, ctx.halt), None)
        ctx.halt.set()

    async def _try_complete(self, ctx: Context) -> bool:
        async with ctx.conn() as conn:
            await save_progress(ctx, conn, force=True)
            # A helper leaves completing to its parent, which logs the summary.
            done = None if self.helper else await jobs.try_complete(conn, ctx.job.id)
            if done is None:
                current = await jobs.load_job(conn, ctx.job.id)
                # Completed (or failed) by another process or the enumerator: stop too.
                return current is None or not current.active
        self._completed = done  # the summary comes once the helpers are done (_finish)
        return True

    async def _finish(self, ctx: Context, done: Job) -> None:
        self._log_summary(done)
        if self.settings.vacuum:
            log.info("[BACKFILL] BACKFILL_VACUUM=true: VACUUM ANALYZE of the touched tables...")
            async with ctx.conn() as conn:
                tables = await jobs.vacuum_analyze(conn)
            log.info("[BACKFILL] VACUUM ANALYZE done: %s", ", ".join(tables))

    def _log_summary(self, job: Job) -> None:
        self.progress.log(self._rss_bytes(), self.settings.max_memory_mb)
        log.info("[BACKFILL] Completed job %d: %s", job.id, json.dumps(job.summary, default=str))
        self.metrics.set_status("completed")
        self._status = {"state": "completed", "job_id": job.id, "summary": job.summary}

    async def _control(self, ctx: Context) -> None:
        last_reclaim = last_renew = time.monotonic()
        seen_pauses = 0
        announced = ""
        while not ctx.halt.is_set():
            async with ctx.conn() as conn:
                job = await jobs.load_job(conn, ctx.job.id)
                if job is None or not job.active:
                    ctx.halt.set()  # completed, failed or superseded elsewhere
                    return
                status = await self._rate_limit_status(ctx, conn, job.status)
                snapshot = await job_status(conn, job)
            self.throttle.paused = status == "paused"
            if status != announced:
                if status != "running" or announced:
                    log.info("[BACKFILL] Job %d is %s", job.id, status)
                announced = status
            pauses = ctx.network.rate_limit_pauses
            if pauses > seen_pauses:
                self.metrics.rate_limit_pauses.inc(pauses - seen_pauses)
                seen_pauses = pauses
            self._publish(snapshot, status)
            now = time.monotonic()
            if now - last_renew >= ctx.lease_s / 3:
                last_renew = now
                async with ctx.conn() as conn:
                    await queue.renew(conn, ctx.job.id, list(ctx.in_flight), ctx.owner, ctx.lease_s)
            if now - last_reclaim >= RECLAIM_EVERY_S:
                last_reclaim = now
                await self._recover_stuck_work(ctx, at_start=False)
            if self.progress.log_due() and not self.helper:
                self.progress.log(self._rss_bytes(), self.settings.max_memory_mb)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.halt.wait(), CONTROL_POLL_S)

    async def _rate_limit_status(self, ctx: Context, conn: Any, status: str) -> str:
        """paused_rate_limited while every known host is paused by a 429; running after."""
        known = ctx.network.known_hosts()
        all_paused = bool(known) and known <= set(ctx.network.paused_hosts())
        self.throttle.rate_limited = all_paused
        if (
            all_paused
            and status == "running"
            and await jobs.set_status(conn, ctx.job.id, "paused_rate_limited", ("running",))
        ):
            return "paused_rate_limited"
        if (
            not all_paused
            and status == "paused_rate_limited"
            and await jobs.set_status(conn, ctx.job.id, "running", ("paused_rate_limited",))
        ):
            return "running"
        return status

    def _publish(self, snapshot: dict[str, Any], status: str) -> None:
        m = self.metrics
        for state, n in snapshot["repos"].items():
            m.repos.labels(state).set(n)
        m.set_status(status)
        m.rss_bytes.set(self.throttle.rss_bytes)
        m.progress_ratio.set(snapshot["progress_ratio"])
        eta = snapshot["eta_s"]
        m.eta_seconds.set(-1 if eta is None else eta)
        self._status = {"state": status, **snapshot}

    async def _save_on_exit(self, ctx: Context) -> None:
        try:
            async with ctx.conn() as conn:
                await save_progress(ctx, conn, force=True)
        except QUERY_RETRY_ERRORS as exc:
            log.warning("[BACKFILL] could not save progress on exit: %s", exc)
        if self._completed is None and not self.helper:
            self.progress.log(self._rss_bytes(), self.settings.max_memory_mb)
            log.info("[BACKFILL] Stopped; progress saved (job %d)", ctx.job.id)


# Connection-level failures only: a PostgresError about the data or a query is a bug that
# retrying would repeat for ever.
OUTAGE_ERRORS = (*TRANSIENT_DB_ERRORS, asyncpg.InterfaceError, asyncpg.InternalClientError)


def is_db_outage(exc: BaseException) -> bool:
    """Whether `exc` (or, for a task group's ExceptionGroup, any exception in it) says the
    database is unreachable rather than that something is wrong with the data or the code."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_db_outage(e) for e in exc.exceptions)
    return isinstance(exc, OUTAGE_ERRORS)


def _first_leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
