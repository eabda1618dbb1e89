"""ResyncService: repos the live stream found desynchronized, fetched whole and re-applied.

The gate (firehose/live/gate.py) queues a repo in `repo_resyncs` when its chain broke (sync
1.1: `since`/`prevData` not matching the stored head, a `#sync` event) or a commit failed its
signature check. This service, running beside the live stream on every worker, makes such a
repo equal to its PDS again:

1. claim due requests with FOR UPDATE SKIP LOCKED under a lease (renewed while it runs;
   expired leases, and those of dead processes on this host, are taken back);
2. download the WHOLE repo with getRepo (`backfill.network.HttpNetwork.fetch`: DID
   resolution, the polite per-host HTTP client, the verified snapshot of backfill/download);
3. write every record with the snapshot's rev through the writer, whose rev guards keep
   newer live rows and respect tombstones (DESIGN.md invariant 2);
4. in one transaction with the last records and the repo head (never backwards): remove the
   repo's rows the snapshot no longer has, leaving tombstones at the snapshot's rev so that
   no older event brings them back (`firehose.storage.snapshots.prune_repo`);
5. done (or pending again if a new request came in meanwhile). Transient failures retry with
   backoff (1 s, 2 s, 4 s ...); after RESYNC_MAX_ATTEMPTS the request is `failed` with its
   error, and a later request re-arms it.

Its errors never stop the live stream (the worker logs and goes on), and on stop the repos in
hand are released, pending again, without counting an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from backfill import queue
from backfill import resync_queries as q
from backfill.dispatch import wait_any
from backfill.download import SkippedRecord
from backfill.network import Network, Snapshot, open_http_network
from backfill.repo_task import failure_reason, is_transient
from backfill.settings import BackfillSettings
from backfill.window import Window
from firehose.model import SnapshotRecord
from firehose.settings import collection_wanted
from firehose.storage.database import QUERY_RETRY_ERRORS
from firehose.storage.prepare import ApplyStats, RepoHead
from firehose.storage.snapshot_rows import snapshot_rows
from firehose.storage.snapshots import prune_repo, write_rows

log = logging.getLogger("backfill.resync")

RESYNC_LEASE_S = 30.0  # renewed every RESYNC_LEASE_S / 3 while a repo is in hand
RESYNC_POLL_S = 1.0  # an empty queue is looked at again this often
RESYNC_RECLAIM_EVERY_S = 15.0
RESYNC_BATCH_RECORDS = 500  # records per write transaction (the live commit interleaves)
RESYNC_REASON_MANUAL = "manual"  # `firehose resync DID...`


@dataclass(frozen=True)
class ResyncMetrics:
    pending: Gauge
    outcomes: Counter
    seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ResyncMetrics:
        return cls(
            pending=Gauge(
                "firehose_resync_pending",
                "Repos waiting for a resync from their PDS (repo_resyncs, state pending). "
                "It should drain to 0; a level that keeps growing means resyncs fail or the "
                "live stream keeps finding broken repo chains.",
                registry=registry,
            ),
            outcomes=Counter(
                "firehose_resyncs_total",
                "Resync attempts by outcome: done (repo equal to its PDS again), retry (a "
                "transient failure, tried again later), failed (given up after "
                "RESYNC_MAX_ATTEMPTS; see repo_resyncs.error).",
                ["outcome"],
                registry=registry,
            ),
            seconds=Histogram(
                "firehose_resync_seconds",
                "Time of one successful resync: download, records written, removals.",
                buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                registry=registry,
            ),
        )


@dataclass(frozen=True, slots=True)
class ResyncClaim:
    did: str
    reason: str
    attempts: int  # failed attempts before this one


@dataclass(frozen=True, slots=True)
class ResyncResult:
    rev: str
    records: int
    removed: int


# -- the queue ---------------------------------------------------------------------------------


async def request(conn: Any, dids: list[str], reason: str = RESYNC_REASON_MANUAL) -> int:
    """Queue `dids` for a resync (re-arming finished ones); the number queued or re-armed."""
    return int(await conn.fetchval(q.RESYNC_REQUEST, dids, reason) or 0)


async def claim(conn: Any, owner: str, limit: int, lease_s: float) -> list[ResyncClaim]:
    rows = await conn.fetch(q.RESYNC_CLAIM, owner, limit, lease_s)
    return [ResyncClaim(r["did"], r["reason"], r["attempts"]) for r in rows]


async def reclaim(conn: Any, max_attempts: int, dead_owners: list[str] | None = None) -> int:
    return int(await conn.fetchval(q.RESYNC_RECLAIM, dead_owners or [], max_attempts) or 0)


async def counts(conn: Any) -> dict[str, int]:
    out = {"pending": 0, "in_progress": 0, "done": 0, "failed": 0}
    for row in await conn.fetch(q.RESYNC_COUNTS):
        out[row["state"]] = int(row["n"])
    return out


async def dead_owners_on_host(conn: Any) -> list[str]:
    """Owners of in-flight resyncs on this host whose process is gone (or is us: a container
    restarts with the same pid), so a kill -9 does not leave repos waiting for the lease."""
    import psutil

    me = os.getpid()
    dead = []
    for row in await conn.fetch(q.RESYNC_OWNERS_ON_HOST, queue.host_prefix()):
        pid = queue.owner_pid(row[0])
        if pid is not None and (pid == me or not psutil.pid_exists(pid)):
            dead.append(row[0])
    return dead


# -- one repo ----------------------------------------------------------------------------------


async def resync_repo(
    pool: asyncpg.Pool,
    snap: Snapshot,
    wanted_collections: tuple[str, ...] = (),
    *,
    activate: bool = False,
) -> ResyncResult:
    """Write `snap` (the whole repo, at its rev) and remove what it no longer has; with
    `activate`, mark the account active (see resync_queries.RESYNC_ACTIVATE)."""
    did, rev = snap.did, snap.rev
    written = 0
    batch: list[SnapshotRecord] = []

    async def write(conn: Any, records: list[SnapshotRecord], heads: list[RepoHead] | None) -> int:
        """`records` written as the backfill writes its batches (snapshot_rows.py); the
        number written."""
        counted = ApplyStats()
        rows = snapshot_rows(did, records, heads, counted)
        return len(records) - (await write_rows(conn, rows, counted)).invalid

    for n, item in enumerate(snap.items(Window(cutoff=None)), 1):
        if not isinstance(item, SkippedRecord) and collection_wanted(item[0], wanted_collections):
            batch.append(item)
        if n % RESYNC_BATCH_RECORDS == 0:
            await asyncio.sleep(0)  # walking a big repo must not hold up the live stream
        if len(batch) >= RESYNC_BATCH_RECORDS:
            async with pool.acquire() as conn:
                written += await write(conn, batch, None)
            batch = []
    # The last records, the removals and the head in one transaction: the head (what the
    # chain checks compare with) never says "in sync" while stale rows are still there.
    async with pool.acquire() as conn, conn.transaction():
        written += await write(conn, batch, [(did, rev, snap.data_cid)])
        removed = await prune_repo(conn, did, rev)
        if activate:
            await conn.execute(q.RESYNC_ACTIVATE, did)
    return ResyncResult(rev, written, removed)


# -- the service -------------------------------------------------------------------------------


class ResyncService:
    def __init__(
        self,
        settings: BackfillSettings,
        pool: asyncpg.Pool,
        registry: CollectorRegistry,
        *,
        relay_url: str,
        worker_id: int,
        network: Network | None = None,
        wanted_collections: tuple[str, ...] = (),
        lease_s: float = RESYNC_LEASE_S,
        poll_s: float = RESYNC_POLL_S,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = ResyncMetrics.create(registry)
        self.relay_url = relay_url
        self.owner = queue.owner_id(worker_id)
        self._network = network
        self._wanted = wanted_collections
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._in_hand: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._pending = 0  # queue-wide, as last read
        self._queue_down = False
        self._finished = {"done": 0, "failed": 0}  # by this process since start

    def status(self) -> dict[str, int]:
        """For /status: the queue's pending requests (as last read), this worker's resyncs in
        hand, and those it finished since it started."""
        return {"pending": self._pending, "in_progress": len(self._in_hand), **self._finished}

    async def run(self, stop: asyncio.Event) -> None:
        async with self._open_network() as net:
            await self._recover(at_start=True)
            last_reclaim = last_renew = time.monotonic()
            try:
                while not stop.is_set():
                    await self._dispatch(net)
                    now = time.monotonic()
                    if now - last_renew >= self._lease_s / 3:
                        last_renew = now
                        await self._guarded(self._renew())
                    if now - last_reclaim >= RESYNC_RECLAIM_EVERY_S:
                        last_reclaim = now
                        await self._recover(at_start=False)
                    await self._wait(stop)
            finally:
                await self._release_all()

    # -- loop steps ----------------------------------------------------------------------------

    async def _dispatch(self, net: Network) -> None:
        free = self.settings.resync_max_concurrent - len(self._in_hand)
        claimed: list[ResyncClaim] = []
        try:
            async with self.pool.acquire() as conn:
                if free > 0:
                    claimed = await claim(conn, self.owner, free, self._lease_s)
                self._pending = int(await conn.fetchval(q.RESYNC_PENDING))
                self.metrics.pending.set(self._pending)
        except QUERY_RETRY_ERRORS as exc:
            # One line per outage, not one per poll.
            (log.debug if self._queue_down else log.warning)(
                "[RESYNC] queue unavailable, trying again every %.0f s: %s", self._poll_s, exc
            )
            self._queue_down = True
            return
        self._queue_down = False
        for c in claimed:
            task = asyncio.create_task(self._one(net, c))
            self._in_hand[c.did] = task
            task.add_done_callback(functools.partial(self._done, c.did))

    def _done(self, did: str, _task: asyncio.Task[None]) -> None:
        self._in_hand.pop(did, None)
        self._wake.set()

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until a repo finishes (a free slot), the poll interval passes, or stop."""
        self._wake.clear()
        await wait_any(set(), (stop, self._wake), self._poll_s)

    async def _one(self, net: Network, c: ResyncClaim) -> None:
        started = time.monotonic()
        try:
            snap = await net.fetch(c.did)
            try:
                result = await resync_repo(
                    self.pool, snap, self._wanted, activate=c.reason == "account_inactive"
                )
            finally:
                snap.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._guarded(self._failed(c, exc))
            return
        self.metrics.seconds.observe(time.monotonic() - started)
        self.metrics.outcomes.labels("done").inc()
        self._finished["done"] += 1
        log.info(
            "[RESYNC] %s resynced at rev %s: %d records, %d removed (%s)",
            c.did, result.rev, result.records, result.removed, c.reason,
        )  # fmt: skip
        await self._guarded(self._mark_done(c, result))

    async def _mark_done(self, c: ResyncClaim, result: ResyncResult) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval(
                q.RESYNC_DONE, c.did, self.owner, result.rev, result.records, result.removed
            )

    async def _failed(self, c: ResyncClaim, exc: BaseException) -> None:
        reason = failure_reason(exc)
        transient = is_transient(exc)
        retry_after = getattr(exc, "retry_after_s", None)
        error = f"{reason}: {exc}"[:1000]
        attempt = c.attempts + 1
        async with self.pool.acquire() as conn:
            if reason == "rate_limited":  # the host asked us to wait: not the repo's fault
                delay = retry_after if retry_after is not None else queue.backoff_s(attempt)
                await conn.fetchval(q.RESYNC_RETRY, c.did, self.owner, error, 0, delay)
                self.metrics.outcomes.labels("retry").inc()
                return
            if transient and attempt < self.settings.resync_max_attempts:
                delay = max(queue.backoff_s(attempt), retry_after or 0.0)
                log.warning(
                    "[RESYNC] %s: attempt %d/%d failed, retry in %.0fs: %s",
                    c.did, attempt, self.settings.resync_max_attempts, delay, error,
                )  # fmt: skip
                await conn.fetchval(q.RESYNC_RETRY, c.did, self.owner, error, 1, delay)
                self.metrics.outcomes.labels("retry").inc()
                return
            log.warning("[RESYNC] %s failed after %d attempt(s): %s", c.did, attempt, error)
            await conn.fetchval(q.RESYNC_FAIL, c.did, self.owner, error)
            self.metrics.outcomes.labels("failed").inc()
            self._finished["failed"] += 1

    async def _renew(self) -> None:
        if self._in_hand:
            async with self.pool.acquire() as conn:
                await conn.execute(q.RESYNC_RENEW, list(self._in_hand), self.owner, self._lease_s)

    async def _recover(self, *, at_start: bool) -> None:
        async def go() -> None:
            async with self.pool.acquire() as conn:
                dead = await dead_owners_on_host(conn) if at_start else []
                taken = await reclaim(conn, self.settings.resync_max_attempts, dead)
            if taken:
                log.info("[RESYNC] took back %d resyncs of stopped or stalled workers", taken)

        await self._guarded(go())

    async def _release_all(self) -> None:
        """Stopping: cancel the repos in hand and hand them back (pending, no attempt)."""
        tasks = list(self._in_hand.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def go() -> None:
            async with self.pool.acquire() as conn:
                await conn.execute(q.RESYNC_RELEASE, self.owner)

        await self._guarded(go())

    async def _guarded(self, aw: Any) -> None:
        """Database steps of the loop: an outage is logged and retried by the next round
        (leases expire and are reclaimed), never raised into the live worker."""
        try:
            await aw
        except QUERY_RETRY_ERRORS as exc:
            log.warning("[RESYNC] database unavailable, trying again later: %s", exc)

    @contextlib.asynccontextmanager
    async def _open_network(self) -> AsyncIterator[Network]:
        if self._network is not None:
            yield self._network
            return
        async with open_http_network(self.settings, self.relay_url) as net:
            yield net
