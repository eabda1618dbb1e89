"""One claimed repo: download, write its in-window records in throttled batches, finish.

* At most BACKFILL_MAX_CONCURRENT repos are in flight per process (the semaphore around
  download + write).
* Records go to firehose.storage.snapshots.write_rows in batches of BACKFILL_BATCH_SIZE,
  with BACKFILL_BATCH_DELAY_MS between batches and the throttles checked before each batch.
  Every row carries the snapshot's rev, so backfill and live converge in any order; the repo
  head (did, rev, data cid) is written with the last batch, once all records are in.
* A failure retries with backoff (1 s, 2 s, 4 s ...) while transient and under
  BACKFILL_MAX_ATTEMPTS; a 429 re-queues the repo for when the host resumes, without
  counting an attempt. When the backfill stops, in-flight repos are released (pending again,
  no attempt counted) with their progress saved.
* With a cutoff (and BACKFILL_SINCE on) the download asks only for what was written after
  it (``getRepo?since=``) plus the profile when that answer lacks it
  (backfill/window_fetch.py); a snapshot that knows no commit (nothing in the window) writes
  no repo head.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from backfill import jobs, queries, queue
from backfill.context import Context, Halted
from backfill.done_marks import DoneMarks
from backfill.download import SkippedRecord
from backfill.group_commit import GroupCommit
from backfill.progress import SAVE_EVERY_RECORDS, Counts
from backfill.queue import Claimed, backoff_s
from backfill.since import PROFILE_COLLECTION
from backfill.window import Window
from firehose.model import SnapshotRecord
from firehose.settings import collection_wanted
from firehose.storage.database import QUERY_RETRY_ERRORS
from firehose.storage.fill_order import FILL_CHUNK_ROWS, chunks_in_filling_order
from firehose.storage.prepare import ApplyStats
from firehose.storage.snapshot_rows import snapshot_rows
from firehose.storage.snapshots import FRESH_COPY_MIN_RECORDS, write_rows
from firehose.storage.together import PreparedSnapshot, prepare_snapshot, write_snapshots

log = logging.getLogger("backfill")

YIELD_EVERY_RECORDS = 1000  # give the event loop a turn while walking a big repo
FAILURE_REASONS = frozenset(
    {
        "connection",
        "timeout",
        "truncated",
        "too_large",
        "bad_response",
        "rate_limited",
        "server_error",
        "not_found",
        "repo_not_found",
        "repo_deactivated",
        "repo_takendown",
        "repo_suspended",
        "client_error",
        "forbidden_address",
        "bad_url",
        "bad_did",
        "bad_document",
        "no_pds",
        "network",
        "database",
    }
)
# Without a `transient` attribute of its own, an error is worth retrying when it is the
# database's (an outage, a broken connection: QUERY_RETRY_ERRORS) or the network's (OSError).
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (OSError, *QUERY_RETRY_ERRORS)


class RepoTask:
    def __init__(self, ctx: Context, slots: asyncio.Semaphore) -> None:
        self.ctx = ctx
        self.slots = slots
        self.window = Window(cutoff=ctx.job.cutoff)
        # The job's window, as getRepo's `since` (None: download whole).
        self.since = self.window.since if ctx.settings.since else None
        self.want_profile = collection_wanted(PROFILE_COLLECTION, ctx.wanted_collections)
        self.done_marks = DoneMarks(ctx.conn, ctx.job.id, ctx.owner, ctx.progress)
        # Small repos finishing together are written together (snapshots.write_snapshots).
        self.small_writes: GroupCommit[PreparedSnapshot, ApplyStats | Exception]
        self.small_writes = GroupCommit(self._write_small)
        # Batches smaller than a chunk: a repo's records go in two passes across its batches,
        # so that a fresh repo's index pages end ~90 % full (firehose/storage/fill_order.py).
        self.fill_across_batches = ctx.settings.batch_size < FILL_CHUNK_ROWS

    async def run(self, c: Claimed) -> None:
        ctx = self.ctx
        async with self.slots:
            ctx.in_flight.add(c.did)
            try:
                await self._process(c)
            except Halted:
                await self._release(c)
            finally:
                ctx.in_flight.discard(c.did)

    async def _process(self, c: Claimed) -> None:
        ctx = self.ctx
        started = time.monotonic()
        try:
            snap = await ctx.until_halt(
                ctx.network.fetch(c.did, since=self.since, want_profile=self.want_profile)
            )
        except Halted:
            raise
        except Exception as exc:
            await self._failed_attempt(c, exc)
            return
        ctx.metrics.fetch_seconds.observe(time.monotonic() - started)
        ctx.metrics.bytes_downloaded.inc(snap.bytes_downloaded)
        ctx.metrics.window.count(snap)
        try:
            written = await self._write(c, snap)
        except Halted:
            raise
        except Exception as exc:
            await self._failed_attempt(c, exc)
            return
        finally:
            snap.close()
        # Done and this process's counters saved: one statement, which the marks of other
        # repos finishing meanwhile share (done_marks.py).
        await self.done_marks.mark(
            queue.DoneMark(c.did, snap.rev or None, written, snap.bytes_downloaded)
        )

    async def _write(self, c: Claimed, snap: Any) -> int:
        """Write the snapshot's in-window records; the number written."""
        ctx = self.ctx
        size = ctx.settings.batch_size
        counts = Counts(bytes=snap.bytes_downloaded)
        written = 0
        since_save = 0
        batch: list[SnapshotRecord] = []
        # None: a snapshot that knows no commit (a `since` answer with no block): no head.
        head = [] if snap.head is None else [snap.head]
        whole = True  # the last batch is the snapshot's only one
        wanted = ctx.wanted_collections
        items = snap.items(self.window)
        if self.fill_across_batches:
            items = chunks_in_filling_order(items, size)
        for n, item in enumerate(items, 1):
            counts.received += 1
            if isinstance(item, SkippedRecord) or not collection_wanted(item[0], wanted):
                counts.skipped += 1
            else:
                batch.append(item)
            if len(batch) >= size:
                written += await self._write_batch(c, batch, None, counts)
                whole = False
                since_save += len(batch)
                batch = []
                if since_save >= SAVE_EVERY_RECORDS:
                    since_save = 0
                    await self._save_repo(c, snap, written)
                await ctx.sleep(ctx.settings.batch_delay_ms / 1000)
            elif n % YIELD_EVERY_RECORDS == 0:
                await asyncio.sleep(0)
        # The last batch (maybe empty) carries the repo head: all records are in by then.
        written += await self._write_batch(c, batch, head, counts, whole=whole)
        return written

    async def _write_batch(
        self,
        c: Claimed,
        batch: list[SnapshotRecord],
        head: Any,
        counts: Counts,
        whole: bool = False,
    ) -> int:
        ctx = self.ctx
        async with ctx.throttle.write_turn(ctx.halt):
            if ctx.halt.is_set():
                raise Halted
            stats = ApplyStats()
            # A small snapshot in one batch: with the others finishing meanwhile, in a few
            # statements for all of them (firehose/storage/together.py). Its rows are made
            # here, by its own task.
            if whole and head and len(batch) < FRESH_COPY_MIN_RECORDS:
                rows = snapshot_rows(c.did, batch, head, stats)
                prepared = prepare_snapshot(rows, stats, head[0], maybe_fresh=not c.headed)
                outcome = await self.small_writes.submit(prepared)
                if isinstance(outcome, Exception):
                    raise outcome  # its own write's error: the others' are theirs
                stats = outcome
            else:
                # A batch that is the whole snapshot takes the load's own two passes: its
                # chunk was left in key order, or (a chunk longer than a batch only through
                # skipped records) snapshot_rows sorts it back. Any other was ordered across
                # the batches already.
                fill = whole or not self.fill_across_batches
                async with ctx.conn() as conn:
                    # Made once a connection is ours: a batch waiting for one holds only its
                    # records, not their rows too (made before the wait, they cost 8 MB more
                    # peak RSS on bench/backfill.py's 1,000 x 500).
                    rows = snapshot_rows(c.did, batch, head, stats)
                    stats = await write_rows(conn, rows, stats, maybe_fresh=not c.headed, fill=fill)
        processed = len(batch) - stats.invalid
        counts.processed += processed
        counts.skipped += stats.invalid
        self._count(counts)
        return processed

    async def _write_small(self, prepared: list[PreparedSnapshot]) -> list[ApplyStats | Exception]:
        async with self.ctx.conn() as conn:
            return await write_snapshots(conn, prepared)

    def _count(self, counts: Counts) -> None:
        """Move `counts` into the process totals (and metrics), then zero it."""
        self.ctx.metrics.count_records(counts)
        self.ctx.progress.add(counts)
        counts.received = counts.processed = counts.skipped = counts.bytes = 0

    async def _save_repo(self, c: Claimed, snap: Any, written: int) -> None:
        ctx = self.ctx
        async with ctx.conn() as conn:
            await queue.save_repo_progress(
                conn, ctx.job.id, c.did, ctx.owner, records=written,
                bytes_=snap.bytes_downloaded, rev=snap.rev or None, lease_s=ctx.lease_s,
            )  # fmt: skip
            await self._save(conn, force=False)

    async def _save(self, conn: Any, *, force: bool) -> None:
        await save_progress(self.ctx, conn, force=force)

    async def _failed_attempt(self, c: Claimed, exc: BaseException) -> None:
        ctx = self.ctx
        reason = failure_reason(exc)
        transient = is_transient(exc)
        retry_after = getattr(exc, "retry_after_s", None)
        ctx.metrics.repo_failures.labels(reason).inc()
        error = f"{reason}: {exc}"[:1000]
        attempt = c.attempts + 1
        async with ctx.conn() as conn:
            if reason == "rate_limited":
                delay = retry_after if retry_after is not None else backoff_s(attempt)
                await queue.mark_retry(
                    conn, ctx.job.id, c.did, ctx.owner, error, delay, counts=False
                )
                return
            if transient and attempt < ctx.settings.max_attempts:
                delay = max(backoff_s(attempt), retry_after or 0.0)
                log.warning(
                    "[BACKFILL] %s: attempt %d/%d failed, retry in %.0fs: %s",
                    c.did, attempt, ctx.settings.max_attempts, delay, error,
                )  # fmt: skip
                await queue.mark_retry(
                    conn, ctx.job.id, c.did, ctx.owner, error, delay, counts=True
                )
                return
            log.warning("[BACKFILL] %s failed after %d attempt(s): %s", c.did, attempt, error)
            await queue.mark_failed(conn, ctx.job.id, c.did, ctx.owner, error)

    async def _release(self, c: Claimed) -> None:
        """Stopping: hand the repo back (pending, no attempt counted) for the next start."""
        ctx = self.ctx
        try:
            async with ctx.conn() as conn:
                await queue.mark_retry(
                    conn, ctx.job.id, c.did, ctx.owner, "interrupted by stop", 0.0, counts=False
                )
        except QUERY_RETRY_ERRORS as exc:
            log.warning("[BACKFILL] could not release %s (its lease will expire): %s", c.did, exc)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed: the error's own `transient` flag (FetchError,
    IdentityError, ...), else its type."""
    return bool(getattr(exc, "transient", isinstance(exc, _TRANSIENT_TYPES)))


def failure_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason in FAILURE_REASONS:
        return reason
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return "database"
    if isinstance(exc, OSError | TimeoutError):
        return "connection"
    return "bad_response"


async def save_progress(ctx: Context, conn: Any, *, force: bool) -> None:
    """Add this process's unsaved counters to the job row (every 1000 records, or now)."""
    if not (force or ctx.progress.save_due()) or ctx.progress.unsaved.empty:
        return
    with ctx.progress.saving() as delta:
        await jobs.add_records(
            conn, ctx.job.id, received=delta.received, processed=delta.processed,
            skipped=delta.skipped, bytes_=delta.bytes,
        )  # fmt: skip
        await conn.execute(queries.BACKFILL_CURSOR_TOUCH)
