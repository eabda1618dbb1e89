"""What the HTTP side asks a running worker: status, readiness, backfill control.

`WorkerOps` implements `firehose.http.Operations` from the pieces the worker hands it (its
settings, committed state, queue, relay client, backfill service), so `firehose.http` knows
nothing of the worker's internals. Nothing here returns or logs the database URL: it holds
the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from backfill import cli as backfill_cli
from firehose.settings import Settings
from firehose.storage import migrate

if TYPE_CHECKING:
    from backfill.resync import ResyncService
    from backfill.service import BackfillService
    from firehose.live.relay import RelayClient

# A readiness probe must answer well within a kubelet's default 1 s... 10 s probe timeout.
READY_DB_TIMEOUT_S = 2.0
# Reconnecting is normal; disconnected for longer than this many times the longest
# reconnect backoff (RECONNECT max) means the relay link is really broken.
RELAY_DOWN_FACTOR = 2.0


@dataclass
class WorkerState:
    """What /status and tests read: the committed position of the live stream. The worker
    updates it, this module reads it: it lives here so the import runs one way only
    (worker -> ops)."""

    cursor: int | None = None
    last_event_time: datetime | None = None
    events_committed: int = 0
    batches_committed: int = 0


class WorkerOps:
    def __init__(
        self,
        settings: Settings,
        state: WorkerState,
        dsn: str,
        queue_depth: Callable[[], int],
        lag_seconds: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._state = state
        self._dsn = dsn
        self._queue_depth = queue_depth
        self._lag_seconds = lag_seconds
        # Set by the worker once they exist.
        self.relay: RelayClient | None = None
        self.backfill: BackfillService | None = None
        self.resync: ResyncService | None = None
        # One connection of its own for probes: a pool busy with batches and backfill
        # writes must not make the worker look unready.
        self._probe: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()

    # -- /status ---------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        w = self._settings.worker
        s = self._state
        relay = self.relay
        backfill: dict[str, Any] = {"enabled": False}
        if self.backfill is not None:
            backfill = {"enabled": True, **self.backfill.status()}
        return {
            "worker_id": w.worker_id,
            "worker_count": w.worker_count,
            "cursor_service": w.cursor_service,
            "cursor": s.cursor,
            "last_event_time": s.last_event_time.isoformat() if s.last_event_time else None,
            "lag_seconds": round(self._lag_seconds(), 3),
            "events_committed": s.events_committed,
            "batches_committed": s.batches_committed,
            "relay_connected": relay is not None and relay.connected,
            "queue_depth": self._queue_depth(),
            "queue_max": self._settings.pipeline.queue_max_frames,
            "backfill": backfill,
            "resyncs": self.resync.status() if self.resync is not None else None,
        }

    # -- /readyz ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, str | None]:
        """Check name -> None when it passes, else why it fails."""
        checks: dict[str, str | None] = {"database": None, "migrations": None, "relay": None}
        async with self._probe_lock:
            try:
                conn = await self._probe_connection()
                await conn.fetchval("SELECT 1", timeout=READY_DB_TIMEOUT_S)
            except Exception as exc:  # any failure is "not ready", never a 500
                await self._drop_probe()
                # The class only: a message could quote connection details.
                checks["database"] = f"unreachable ({type(exc).__name__})"
                checks["migrations"] = "unknown (database unreachable)"
            else:
                try:
                    names = await asyncio.wait_for(migrate.pending(conn), READY_DB_TIMEOUT_S)
                except Exception as exc:
                    await self._drop_probe()
                    checks["migrations"] = f"check failed ({type(exc).__name__})"
                else:
                    if names:
                        checks["migrations"] = "pending: " + ", ".join(names)
        checks["relay"] = self._relay_check()
        return checks

    def _relay_check(self) -> str | None:
        relay = self.relay
        if relay is None:
            return "not started"
        if relay.connected or relay.disconnected_since is None:
            return None
        down_s = time.monotonic() - relay.disconnected_since
        limit_s = RELAY_DOWN_FACTOR * self._settings.relay.reconnect_max_s
        if down_s < limit_s:
            return None
        return f"disconnected for {down_s:.0f} s (limit {limit_s:.0f} s)"

    async def _probe_connection(self) -> asyncpg.Connection:
        if self._probe is None or self._probe.is_closed():
            self._probe = await asyncpg.connect(self._dsn, timeout=READY_DB_TIMEOUT_S)
        return self._probe

    async def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.terminate()  # no goodbye to a server that may be gone
            self._probe = None

    async def close(self) -> None:
        async with self._probe_lock:
            if self._probe is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._probe.close(), READY_DB_TIMEOUT_S)
                self._probe = None

    # -- POST /backfill/pause|resume ---------------------------------------------------------

    async def backfill_control(self, verb: str) -> tuple[bool, dict[str, Any]]:
        """Same as `firehose backfill pause|resume`: through the job row, which running
        workers read every second."""
        conn = await asyncpg.connect(self._dsn, timeout=READY_DB_TIMEOUT_S)
        try:
            job, moved = await backfill_cli.control(conn, verb)
        finally:
            await conn.close()
        if job is None:
            return False, {"ok": False, "error": "no backfill job"}
        if not moved:
            return False, {"ok": False, "job_id": job.id, "error": f"job is {job.status}"}
        return True, {"ok": True, "job_id": job.id, "was": job.status}
