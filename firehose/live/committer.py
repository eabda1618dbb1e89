"""The committer: batches off the reader's queue, screened, written in one transaction each.

Each batch commits its rows and its cursor in one transaction (design invariant 1), batches
commit strictly one after the other in firehose order (invariant 3), and at most two are held
besides the bounded queue (invariant 4). On stop it finishes the batch in hand plus what is
already queued, within STOP_DRAIN_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from firehose.live.batch import BatchBuilder
from firehose.live.gate import Gate
from firehose.live.queue import LOOP_SLICE_S, EventQueue
from firehose.metrics import LiveMetrics, LiveTally, ops_collection_label
from firehose.model import Batch
from firehose.ops import WorkerState
from firehose.settings import PipelineSettings
from firehose.storage import prepare, refusals, writer
from firehose.storage.database import QUERY_RETRY_ERRORS, Database
from firehose.storage.snapshots import REFUSED

log = logging.getLogger("firehose.worker")  # the worker's lines, under the name they always had

STOP_DRAIN_S = 7.0  # SIGTERM → exit within 10 s, leaving room for closing the pool
DB_RETRY_MIN_S = 0.5
DB_RETRY_MAX_S = 10.0


class Committer:
    def __init__(
        self,
        pipeline: PipelineSettings,
        *,
        service: str,
        owns_did: Callable[[str], bool] | None,
        queue: EventQueue,
        gate: Gate,
        metrics: LiveMetrics,
        tally: LiveTally,
        state: WorkerState,
        stop: asyncio.Event,
        latency_samples: list[float] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._service = service  # the cursor row this worker saves with its batches
        self._owns_did = owns_did
        self._queue = queue
        self._gate = gate
        self._metrics = metrics
        self._tally = tally
        self._state = state
        self._stop = stop
        # A benchmark's list of every event's read → commit latency (_observe_latency).
        self._latency_samples = latency_samples

    async def run(self, db: Database) -> None:
        pipeline = self._pipeline
        builder = BatchBuilder(pipeline.wanted_collections, self._owns_did)
        max_wait_s = pipeline.batch_max_wait_ms / 1000
        reader_done = False
        drain_deadline: float | None = None
        # Pipelining: batch N's transaction runs on the server (a task) while this loop
        # collects and prepares batch N+1 (pure CPU, in slices), from the moment N's rows
        # statement is sent until N commits, so the worker's CPU and PostgreSQL's work
        # overlap. Transactions stay strictly one after the other (N+1 starts after N
        # committed), which keeps per-repo order (invariant 3) and the cursor order; at most
        # two batches are held besides the bounded queue (invariant 4).
        in_flight: asyncio.Task[None] | None = None
        flying: prepare.PreparedBatch | None = None  # the batch `in_flight` writes
        # What batches done with hold (their events, writes, rows), dropped a slice at a time
        # while the next batch is prepared (_prepare): dropping a committed 1,000-event batch
        # at once took 2 ms of the loop between its COMMIT and the next batch's BEGIN.
        trash: list[list[Any]] = []
        try:
            while not reader_done:
                items, reader_done = await self._queue.collect(
                    pipeline.batch_max_events, max_wait_s
                )
                read_times = await self._admit(builder, items)
                trash.append(items)
                if self._stop.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + STOP_DRAIN_S
                prepared = None
                if len(builder):
                    prepared = await self._prepare(builder.take(), trash)
                else:
                    # No event with a seq (#info frames only, rare): nothing to prepare, so
                    # whatever is in the trash (with the previous batch's rows) goes at once.
                    trash.clear()
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                if flying is not None:
                    trash.extend(prepare.bulky_lists(flying))
                    flying = None
                if prepared is not None:
                    rows_sent = asyncio.Event()
                    in_flight = asyncio.create_task(
                        self._apply(db, prepared, drain_deadline, read_times, rows_sent)
                    )
                    flying = prepared
                    # The transaction's short statements first (BEGIN, heads, accounts), with
                    # no batch work of ours in their way; the next batch is collected and
                    # prepared while the server writes the rows. (Traced: those round trips
                    # waited on our slices, 12.6 of a 55.6 ms cycle; bench/live.py 4 pairs
                    # alternating, loads 0.41-0.44: faster in every pair, 1.097x summed.)
                    await rows_sent.wait()
                if drain_deadline is not None and time.monotonic() > drain_deadline:
                    if in_flight is not None:  # started already; its retries obey the deadline
                        await in_flight
                        in_flight = None
                    log.warning("stop: drain deadline reached; unsaved events replay on restart")
                    return
            if in_flight is not None:
                await in_flight
                in_flight = None
        finally:
            if in_flight is not None:  # cancelled or failed: never leave a transaction behind
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight

    async def _admit(self, builder: BatchBuilder, items: list[Any]) -> list[float]:
        """Screen the items through the gate (firehose.live.gate) and add them to the batch:
        kept events with their rows, dropped ones as a cursor move only, resync requests
        alongside. Returns the items' read times."""
        events = [event for _, event in items]
        verdict = await self._gate.screen(events)
        await asyncio.sleep(0)  # see LOOP_SLICE_S
        dropped = verdict.dropped
        for i, event in enumerate(events):
            if i in dropped:
                builder.skip(event)
            else:
                builder.add(event)
        for did, reason in verdict.resyncs.items():
            builder.request_resync(did, reason)
        return [read_at for read_at, _ in items]

    async def _prepare(self, batch: Batch, trash: list[list[Any]]) -> prepare.PreparedBatch:
        """prepare.prepare_steps on the loop, with the lists in `trash` emptied a slice at a
        time in between, yielding every LOOP_SLICE_S: the transaction in flight meanwhile
        gets its round trips through. `trash` is empty when it returns."""
        clock = time.monotonic
        steps = prepare.prepare_steps(batch, batch.heads)
        prepared: prepare.PreparedBatch | None = None
        yield_at = clock() + LOOP_SLICE_S
        while prepared is None or trash:
            if prepared is None:
                try:
                    next(steps)
                except StopIteration as done:
                    prepared = done.value
            if trash:
                items = trash[-1]
                del items[-prepare.PREPARE_STEP_WRITES :]
                if not items:
                    trash.pop()
            if clock() >= yield_at:
                await asyncio.sleep(0)
                yield_at = clock() + LOOP_SLICE_S
        return prepared

    async def _apply(
        self,
        db: Database,
        prepared: prepare.PreparedBatch,
        deadline: float | None,
        read_times: list[float],
        rows_sent: asyncio.Event,
    ) -> None:
        try:
            batch = prepared.batch
            delay_s = DB_RETRY_MIN_S
            while True:
                started = time.perf_counter()
                try:
                    await db.run(
                        writer.apply_prepared, prepared, service=self._service, rows_sent=rows_sent
                    )
                except QUERY_RETRY_ERRORS as exc:
                    self._metrics.db_errors.inc()
                    if isinstance(exc, REFUSED):
                        # A row PostgreSQL refuses fails every retry alike: commit the rest.
                        rest = await self._without_refused(db, batch, exc)
                        if rest is not None:
                            prepared = prepare.prepare_batch(rest, rest.heads)
                            batch = rest
                            continue
                    # Nothing was committed (one transaction): retrying the same batch is safe,
                    # and the rev guards make it idempotent anyway.
                    log.error("batch commit failed, retrying in %.1f s: %s", delay_s, exc)
                    if deadline is not None and time.monotonic() + delay_s > deadline:
                        raise
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, DB_RETRY_MAX_S)
                    continue
                self._committed(batch, time.perf_counter() - started)
                if prepared.stats.invalid:
                    # Writes the tables cannot index (an AT-URI over MAX_INDEXED_TEXT_CHARS, i.e. a
                    # DID of ~1000 chars): the writer skips them so the batch commits; count them.
                    self._tally.invalid("too_large").inc(prepared.stats.invalid)
                self._observe_latency(read_times)
                return
        finally:
            rows_sent.set()  # failed, cancelled, or no rows to write: never leave it unset

    async def _without_refused(self, db: Database, batch: Batch, exc: Exception) -> Batch | None:
        """The batch less the parts PostgreSQL refuses on their own, each logged and counted
        (firehose/storage/refusals.py); None when none could be isolated, or the probes
        themselves failed: the caller then retries the whole batch."""
        log.error("batch commit refused by PostgreSQL, finding the rows it refuses: %s", exc)
        try:
            found = await db.run(refusals.find_refused, batch)
        except QUERY_RETRY_ERRORS as probe_exc:
            log.error("finding the refused rows failed: %s", probe_exc)
            return None
        for refused in found:
            log.error(
                "skipping the %s in the batch up to seq %s: PostgreSQL refuses it: %s",
                refused.describe(),
                batch.cursor,
                refused.error,
            )
        if not found:
            return None
        self._tally.invalid("refused").inc(len(found))
        return refusals.without(batch, found)

    def _committed(self, batch: Batch, elapsed_s: float) -> None:
        self._tally.flush()
        m = self._metrics
        m.batch_seconds.observe(elapsed_s)
        m.batch_events.observe(batch.events)
        # One pass, labels per distinct (action, collection): 0.20 µs per write against 0.52
        # for a Counter over label tuples plus a second pass for `sanitized` (timeit, load
        # average 0.28).
        ops: dict[tuple[Any, str], int] = {}
        get = ops.get
        sanitized = 0
        for w in batch.writes:
            key = (w.action, w.collection)
            ops[key] = get(key, 0) + 1
            if w.sanitized:
                sanitized += 1
        for (action, collection), count in ops.items():
            m.ops.labels(action.value, ops_collection_label(collection)).inc(count)
        if sanitized:
            m.sanitized.inc(sanitized)
        state = self._state
        if batch.cursor is not None:
            m.cursor.set(batch.cursor)
            state.cursor = batch.cursor
        if batch.last_event_time is not None:
            state.last_event_time = batch.last_event_time
        state.events_committed += batch.events
        state.batches_committed += 1

    def _observe_latency(self, read_times: list[float]) -> None:
        """Read → commit latency: the histogram gets the batch's oldest event (one observe
        per batch keeps the hot path cheap); `latency_samples`, when a benchmark passes a
        list, gets every event."""
        if not read_times:
            return
        now = time.monotonic()
        self._metrics.commit_latency.observe(now - read_times[0])
        if self._latency_samples is not None:
            self._latency_samples.extend(now - t for t in read_times)
