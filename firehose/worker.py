"""The unified worker: relay → decode → batch → one transaction per batch.

`run()` reads like a table of contents. `stop()` only sets an event: the reader stops
reading, the committer (firehose/live/committer.py) finishes the batch in hand plus what is
already queued (within `STOP_DRAIN_S`), saves the cursor with it, and `run()` returns.
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
from firehose.live.batch import shard_filter
from firehose.live.chain import ChainScreen, load_repo_states
from firehose.live.committer import DB_RETRY_MAX_S, DB_RETRY_MIN_S, Committer
from firehose.live.gate import Gate, GateMetrics, Screen
from firehose.live.queue import LOOP_SLICE_S, EventQueue
from firehose.live.relay import RelayClient
from firehose.live.verify import SignatureScreen
from firehose.metrics import LiveMetrics, LiveTally
from firehose.model import CommitEvent, Event, OtherShardEvent
from firehose.ops import WorkerOps, WorkerState
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import FrameLimits, decode_frame
from firehose.settings import Settings
from firehose.storage import writer
from firehose.storage.database import QUERY_RETRY_ERRORS, Database, DatabaseWaitStopped

log = logging.getLogger("firehose.worker")

PROGRESS_LOG_INTERVAL_S = 15.0
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
        # A benchmark's list for every event's read -> commit latency (bench/live.py): set
        # before run(), which hands it to the committer.
        self.latency_samples: list[float] | None = None
        self._stop = asyncio.Event()
        # Read and decoded, waiting for the committer (bounded: back-pressure, invariant 4).
        self._queue = EventQueue(settings.pipeline.queue_max_frames)
        self._limits = FrameLimits(max_frame_bytes=settings.relay.max_frame_bytes)
        # Other shards' events are read only as far as their seq (decode_frame).
        self._owns_did = shard_filter(settings.worker)
        self._service = settings.worker.cursor_service
        self.metrics.queue_depth.set_function(self._queue.qsize)
        self._tally = LiveTally(self.metrics)
        self.metrics.lag_seconds.set_function(self._lag_seconds)
        self.ops: WorkerOps | None = None  # /status, /readyz, admin: built once db is open
        self._gate_metrics = GateMetrics.create(self.registry)
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
            gate = Gate(self._screens(db), self._gate_metrics)
            start_cursor = await self._start_cursor_when_reachable(db)
            if start_cursor is _STOPPED:
                return
            relay = ops.relay = RelayClient(self.settings.relay, self.metrics, start_cursor)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._report_progress())
                tg.create_task(self._read(relay))
                tg.create_task(self._committer(gate).run(db))
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

    def _committer(self, gate: Gate) -> Committer:
        """Batch + commit: firehose/live/committer.py."""
        return Committer(
            self.settings.pipeline,
            service=self._service,
            owns_did=self._owns_did,
            queue=self._queue,
            gate=gate,
            metrics=self.metrics,
            tally=self._tally,
            state=self.state,
            stop=self._stop,
            latency_samples=self.latency_samples,
        )

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
                await self._queue.put((read_at, event))
                if read_at >= yield_at:
                    await asyncio.sleep(0)  # see LOOP_SLICE_S
                    yield_at = clock() + LOOP_SLICE_S
        finally:
            self._tally.flush()
            await self._queue.close()

    def _decode(self, frame: bytes) -> Event | None:
        try:
            event = decode_frame(frame, self._limits, self._owns_did)
        except ProtocolError as err:
            self._tally.invalid(err.reason).inc()
            log.warning("skipping malformed frame (%s): %s", err.reason, err.detail)
            return None
        counts = self._tally.decoded
        # Another shard's event counts as the type it is on the wire (what was read).
        name = event.event_type if type(event) is OtherShardEvent else type(event).__name__
        counts[name] = counts.get(name, 0) + 1
        if isinstance(event, CommitEvent) and event.invalid_ops:
            for reason, detail in event.invalid_ops:
                self._tally.invalid(reason).inc()
                log.warning("skipping invalid op in %s seq %d: %s", event.did, event.seq, detail)
        return event

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
