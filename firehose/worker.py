"""The unified worker: relay → decode → batch → one transaction per batch.

`run()` reads like a table of contents. `stop()` only sets an event: the reader stops
reading, the committer finishes the batch in hand plus what is already queued (within
`STOP_DRAIN_S`), saves the cursor with it, and `run()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from backfill.resync import ResyncService
from backfill.service import BackfillService, LivePressure
from backfill.service import should_run as should_run_backfill
from firehose.gctune import tune_gc
from firehose.http import start_http
from firehose.live.batch import BatchBuilder, shard_filter
from firehose.live.chain import ChainScreen, load_repo_states
from firehose.live.gate import Gate, GateMetrics, Screen
from firehose.live.relay import RelayClient
from firehose.live.verify import SignatureScreen
from firehose.metrics import LiveMetrics, ops_collection_label
from firehose.model import Batch, CommitEvent, Event, OtherShardEvent
from firehose.ops import WorkerOps, WorkerState
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import FrameLimits, decode_frame
from firehose.settings import Settings
from firehose.storage import refusals, writer
from firehose.storage.database import QUERY_RETRY_ERRORS, Database, DatabaseWaitStopped
from firehose.storage.snapshots import REFUSED

log = logging.getLogger("firehose.worker")

PROGRESS_LOG_INTERVAL_S = 15.0
STOP_DRAIN_S = 7.0  # SIGTERM → exit within 10 s, leaving room for closing the pool
DB_RETRY_MIN_S = 0.5
DB_RETRY_MAX_S = 10.0
# The longest run of CPU work on the event loop between two yields, for the reader's decoding
# and the committer's preparing of the next batch. The batch transaction sends each of its
# statements (five to eight round trips per batch) only when the loop runs, and neither a
# buffered socket nor a non-full queue suspends the reader, so a long run of work stretches
# every round trip of it. A yield costs a loop iteration. bench/live.py (100,000 events, load
# average 0.44-0.58), for the reader: yielding every 16 frames (~1 ms) 6,446-6,866 events/s,
# every 4 (~0.25 ms) 7,634-8,312, every frame 6,499-6,885. For the committer: a new batch
# transaction's BEGIN used to wait until the next batch was prepared in one run (gate, rows,
# JSON: 9.5 ms of a 55 ms cycle per 1,000 events, traced); preparing in slices, 200,000
# events, seven pairs alternating (load average 0.41-0.44): faster in every pair, 139,932
# against 131,280 events/s summed (docs/performance-log.md, issue 11 session 12).
LOOP_SLICE_S = 0.00025
_EVENT_TYPE = {
    "CommitEvent": "commit",
    "SyncEvent": "sync",
    "IdentityEvent": "identity",
    "AccountEvent": "account",
    "InfoEvent": "info",
    "ErrorFrame": "error",
}
_DONE = object()  # queue sentinel: the reader has stopped
_STOPPED = object()  # stop() came while waiting for the start cursor


class Worker:
    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        default_cursor: int | None = None,
    ) -> None:
        self.settings = settings
        # Where to start when no cursor is saved and START_CURSOR is unset: None is the
        # relay's live tip (the real network); the devnet passes 0, its oldest event.
        self._default_cursor = default_cursor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = LiveMetrics.create(self.registry)
        self.state = WorkerState()
        self.latency_samples: list[float] | None = None
        self._stop = asyncio.Event()
        # Items are (read time, event), or _DONE once the reader has stopped.
        self._queue: asyncio.Queue[Any] = asyncio.Queue(settings.pipeline.queue_max_frames)
        # The committer waiting for a batch: set by the reader once `_wanted` items (or its
        # end) are queued (see _collect).
        self._filled = asyncio.Event()
        self._wanted = 0
        self._limits = FrameLimits(max_frame_bytes=settings.relay.max_frame_bytes)
        # Other shards' events are read only as far as their seq (decode_frame).
        self._owns_did = shard_filter(settings.worker)
        self._service = settings.worker.cursor_service
        self.metrics.queue_depth.set_function(self._queue.qsize)
        # Labelled children built once: labels() costs a lock and a dict lookup.
        self._event_counters = {
            cls: self.metrics.events.labels(label) for cls, label in _EVENT_TYPE.items()
        }
        self._other_events = self.metrics.events.labels("other")
        # Events decoded by type name, moved into those counters at every commit and when the
        # reader stops: a counter's inc() takes a lock (timeit: 0.5-0.8 µs a call against
        # 0.1-0.2 µs for the dict update).
        self._events_decoded: dict[str, int] = {}
        self._invalid_counters: dict[str, Any] = {}
        self.metrics.lag_seconds.set_function(self._lag_seconds)
        self.ops: WorkerOps | None = None  # /status, /readyz, admin: built once db is open
        self._gate_metrics = GateMetrics.create(self.registry)
        self._gate = Gate((), self._gate_metrics)  # its screens need the database: run()
        self._signatures: SignatureScreen | None = None  # VERIFY_SIGNATURES; closed by run()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            # Waits for an unreachable database (capped backoff) rather than exiting into a
            # crash loop; stop() during the wait ends run() cleanly.
            db = await Database.open(self.settings.database, stop=self._stop)
        except DatabaseWaitStopped:
            log.info("worker stopped while waiting for the database")
            return
        s = self.settings
        ops = self.ops = WorkerOps(s, self.state, db.dsn, self._queue.qsize, self._lag_seconds)
        http = await start_http(self.registry, s.metrics_port, ops=ops, admin_token=s.admin_token)
        tune_gc()
        try:
            self._gate = Gate(self._screens(db), self._gate_metrics)
            start_cursor = await self._start_cursor_when_reachable(db)
            if start_cursor is _STOPPED:
                return
            relay = ops.relay = RelayClient(self.settings.relay, self.metrics, start_cursor)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._report_progress())
                tg.create_task(self._read(relay))
                tg.create_task(self._commit(db))
                if should_run_backfill(self.settings.backfill, self.settings.worker.worker_id):
                    tg.create_task(self._backfill(db))
                tg.create_task(self._resync(db))
        finally:
            if http is not None:
                await http.cleanup()
            await ops.close()
            if self._signatures is not None:
                await self._signatures.aclose()
            await db.close()
            log.info("worker stopped at cursor %s", self.state.cursor)

    def _screens(self, db: Database) -> list[Screen]:
        """The gate's steps, in order: signatures before chain checks (see gate.py)."""
        screens: list[Screen] = []
        owns = self._owns_did  # other shards' repos are not judged
        if self.settings.verify_signatures:
            backfill = self.settings.backfill  # PLC_URL and ALLOW_PRIVATE_NETWORK are shared
            self._signatures = SignatureScreen.open(
                backfill.plc_url,
                backfill.allow_private_network,
                self.registry,
                owns_did=owns,
                allowed_private_hosts=backfill.allowed_private_hosts,
            )
            screens.append(self._signatures)
        # Sync 1.1 repo chain checks (firehose/live/chain.py), after the signatures so that a
        # forged commit never moves the chain state.
        screens.append(ChainScreen(lambda dids: db.run(load_repo_states, dids), owns_did=owns))
        return screens

    async def _start_cursor_when_reachable(self, db: Database) -> Any:
        """`_start_cursor`, retried while the database is unreachable (it may go away right
        after it opened; exiting here would only restart into the same wait). _STOPPED when
        stop() came first."""
        delay_s = DB_RETRY_MIN_S
        while True:
            try:
                return await self._start_cursor(db)
            except QUERY_RETRY_ERRORS as exc:
                self.metrics.db_errors.inc()
                log.error("reading the saved cursor failed, retrying in %.1f s: %s", delay_s, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay_s)
            if self._stop.is_set():
                return _STOPPED
            delay_s = min(delay_s * 2, DB_RETRY_MAX_S)

    async def _start_cursor(self, db: Database) -> int | None:
        saved = await db.run(writer.load_cursor, self._service)
        self.state.cursor = saved
        forced = self.settings.relay.start_cursor
        if forced is not None:
            log.info("START_CURSOR=%d: replaying from there (saved cursor was %s)", forced, saved)
            return forced
        if saved is not None:
            log.info("resuming %r from saved cursor %d", self._service, saved)
            return saved
        # No row for this shard but rows of others: WORKER_COUNT changed (or a shard is new).
        # The live tip would skip this shard's events after the oldest other cursor; the
        # minimum replays some events twice instead, which the rev guards make harmless.
        others = await db.run(writer.load_min_cursor_of_other_shards, self._service)
        if others is not None:
            log.warning(
                "no saved cursor for %r but other shards have one: starting from their "
                "minimum %d (WORKER_COUNT changed?)",
                self._service,
                others,
            )
            return others
        if self._default_cursor is None:
            log.info("no saved cursor for %r: starting from the live tip", self._service)
        else:
            log.info("no saved cursor for %r: starting at %d", self._service, self._default_cursor)
        return self._default_cursor

    async def _report_progress(self) -> None:
        """One log line per interval, so `docker-compose logs python-worker` shows progress."""
        last_events, last_t = self.state.events_committed, time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PROGRESS_LOG_INTERVAL_S)
            now = time.monotonic()
            events = self.state.events_committed
            rate = (events - last_events) / max(now - last_t, 1e-9)
            last_events, last_t = events, now
            log.info(
                "[FIREHOSE] Progress: cursor %s, %d events committed (%.0f evt/s), lag %.1fs, "
                "queue %d",
                self.state.cursor,
                events,
                rate,
                self._lag_seconds(),
                self._queue.qsize(),
            )

    # -- read + decode ---------------------------------------------------------------

    async def _read(self, relay: RelayClient) -> None:
        clock = time.monotonic
        yield_at = clock() + LOOP_SLICE_S
        try:
            async for frame in relay.frames(self._stop):
                event = self._decode(frame)
                if event is None:
                    continue
                if not relay.observe(event):
                    continue  # seq not increasing on this connection: dropped, counted
                # bounded: a slow database slows the socket (back-pressure, invariant 4)
                read_at = clock()
                await self._enqueue((read_at, event))
                if read_at >= yield_at:
                    await asyncio.sleep(0)  # see LOOP_SLICE_S
                    yield_at = clock() + LOOP_SLICE_S
        finally:
            self._count_events()
            await self._enqueue(_DONE)

    async def _enqueue(self, item: Any) -> None:
        """Queue an item for the committer, waking it when its batch is full (_collect)."""
        queue = self._queue
        await queue.put(item)
        if 0 < self._wanted <= queue.qsize() or item is _DONE:
            self._filled.set()

    def _decode(self, frame: bytes) -> Event | None:
        try:
            event = decode_frame(frame, self._limits, self._owns_did)
        except ProtocolError as err:
            self._invalid(err.reason).inc()
            log.warning("skipping malformed frame (%s): %s", err.reason, err.detail)
            return None
        counts = self._events_decoded
        # Another shard's event counts as the type it is on the wire (what was read).
        name = event.event_type if type(event) is OtherShardEvent else type(event).__name__
        counts[name] = counts.get(name, 0) + 1
        if isinstance(event, CommitEvent) and event.invalid_ops:
            for reason, detail in event.invalid_ops:
                self._invalid(reason).inc()
                log.warning("skipping invalid op in %s seq %d: %s", event.did, event.seq, detail)
        return event

    def _count_events(self) -> None:
        """Move the events decoded so far into firehose_events_total."""
        counts, self._events_decoded = self._events_decoded, {}
        for name, n in counts.items():
            self._event_counters.get(name, self._other_events).inc(n)

    def _invalid(self, reason: str) -> Any:
        counter = self._invalid_counters.get(reason)
        if counter is None:  # reasons come from a fixed set: the dict stays small
            counter = self._invalid_counters[reason] = self.metrics.invalid.labels(reason)
        return counter

    # -- batch + commit --------------------------------------------------------------

    async def _commit(self, db: Database) -> None:
        pipeline = self.settings.pipeline
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
        flying: writer.PreparedBatch | None = None  # the batch `in_flight` writes
        # What batches done with hold (their events, writes, rows), dropped a slice at a time
        # while the next batch is prepared (_prepare): dropping a committed 1,000-event batch
        # at once took 2 ms of the loop between its COMMIT and the next batch's BEGIN.
        trash: list[list[Any]] = []
        try:
            while not reader_done:
                items, reader_done = await self._collect(pipeline.batch_max_events, max_wait_s)
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
                    trash.extend(writer.bulky_lists(flying))
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

    async def _collect(self, max_events: int, max_wait_s: float) -> tuple[list[Any], bool]:
        """Queued (read time, event) items until `max_events` or `max_wait_s` passed since
        the first one. Returns them and whether the reader is done.

        While the queue is short of a batch, it waits for the reader to signal that enough
        items (or its end) are queued: one wake-up per batch, where waiting for each item
        cost a task and a timer per event."""
        queue = self._queue
        item = await queue.get()
        deadline = time.monotonic() + max_wait_s
        items: list[Any] = []
        while item is not _DONE:
            items.append(item)
            if len(items) >= max_events:
                break
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._filled.clear()
                # A queue shorter than the batch (QUEUE_MAX_FRAMES < BATCH_MAX_EVENTS) signals
                # when full: the reader is blocked then, and the batch fills in turns.
                self._wanted = min(max_events - len(items), queue.maxsize)
                try:
                    async with asyncio.timeout(remaining):
                        await self._filled.wait()
                except TimeoutError:
                    pass
                finally:
                    self._wanted = 0
                if queue.empty():
                    break
            item = queue.get_nowait()
        return items, item is _DONE

    async def _prepare(self, batch: Batch, trash: list[list[Any]]) -> writer.PreparedBatch:
        """writer.prepare_steps on the loop, with the lists in `trash` emptied a slice at a
        time in between, yielding every LOOP_SLICE_S: the transaction in flight meanwhile
        gets its round trips through. `trash` is empty when it returns."""
        clock = time.monotonic
        steps = writer.prepare_steps(batch, batch.heads)
        prepared: writer.PreparedBatch | None = None
        yield_at = clock() + LOOP_SLICE_S
        while prepared is None or trash:
            if prepared is None:
                try:
                    next(steps)
                except StopIteration as done:
                    prepared = done.value
            if trash:
                items = trash[-1]
                del items[-writer.PREPARE_STEP_WRITES :]
                if not items:
                    trash.pop()
            if clock() >= yield_at:
                await asyncio.sleep(0)
                yield_at = clock() + LOOP_SLICE_S
        return prepared

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

    async def _apply(
        self,
        db: Database,
        prepared: writer.PreparedBatch,
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
                    self.metrics.db_errors.inc()
                    if isinstance(exc, REFUSED):
                        # A row PostgreSQL refuses fails every retry alike: commit the rest.
                        rest = await self._without_refused(db, batch, exc)
                        if rest is not None:
                            prepared = writer.prepare_batch(rest, rest.heads)
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
                    self._invalid("too_large").inc(prepared.stats.invalid)
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
        self._invalid("refused").inc(len(found))
        return refusals.without(batch, found)

    def _committed(self, batch: Batch, elapsed_s: float) -> None:
        self._count_events()
        m = self.metrics
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
        if batch.cursor is not None:
            m.cursor.set(batch.cursor)
            self.state.cursor = batch.cursor
        if batch.last_event_time is not None:
            self.state.last_event_time = batch.last_event_time
        self.state.events_committed += batch.events
        self.state.batches_committed += 1

    def _observe_latency(self, read_times: list[float]) -> None:
        """Read → commit latency: the histogram gets the batch's oldest event (one observe
        per batch keeps the hot path cheap); `latency_samples`, when a benchmark sets it to a
        list, gets every event."""
        if not read_times:
            return
        now = time.monotonic()
        self.metrics.commit_latency.observe(now - read_times[0])
        if self.latency_samples is not None:
            self.latency_samples.extend(now - t for t in read_times)

    async def _backfill(self, db: Database) -> None:
        """History in the background, yielding while the live stream is behind. Its errors
        stop the backfill only, never the live stream."""
        service = BackfillService(
            self.settings.backfill,
            db.pool,
            self.registry,
            relay_url=self.settings.relay.url,
            worker_id=self.settings.worker.worker_id,
            live_pressure=lambda: LivePressure(
                self._lag_seconds(), self._queue.qsize(), self._queue.maxsize
            ),
            wanted_collections=self.settings.pipeline.wanted_collections,
            dsn=db.dsn,
        )
        if self.ops is not None:
            self.ops.backfill = service
        try:
            await service.run(self._stop)
        except Exception:
            log.exception("[BACKFILL] stopped by an error; the live stream goes on")

    async def _resync(self, db: Database) -> None:
        """Repos the gate found desynchronized, fetched whole from their PDS (every worker
        helps: the queue hands each repo to one). Its errors never stop the live stream."""
        service = ResyncService(
            self.settings.backfill,
            db.pool,
            self.registry,
            relay_url=self.settings.relay.url,
            worker_id=self.settings.worker.worker_id,
            wanted_collections=self.settings.pipeline.wanted_collections,
        )
        if self.ops is not None:
            self.ops.resync = service
        try:
            await service.run(self._stop)
        except Exception:
            log.exception("[RESYNC] stopped by an error; the live stream goes on")

    def _lag_seconds(self) -> float:
        t = self.state.last_event_time
        if t is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - t).total_seconds())


async def run_until_signalled(worker: Worker) -> None:
    """Run the worker; SIGTERM/SIGINT call stop() (finish the batch, save the cursor)."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, worker.stop)
    await worker.run()
