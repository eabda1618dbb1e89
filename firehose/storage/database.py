"""The worker's handle on PostgreSQL: embedded or external, migrated, pooled.

Without `DATABASE_URL` the worker starts the embedded PostgreSQL (pgserver) in `DATA_DIR`
and says so in the log; the same data survives a restart. Migrations are applied at
start-up under an advisory lock, so several workers may start at once.

The worker opens it with `stop=`: a server that is not reachable yet (compose starting `db`
and the worker together, a restart of PostgreSQL) is waited for with capped backoff, one
log line per attempt, instead of exiting into a crash loop. What retrying cannot fix (a
wrong password, a missing database, a failed migration) still stops start-up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import asyncpg

from firehose.redact import redact_password
from firehose.settings import DatabaseSettings
from firehose.storage import migrate

log = logging.getLogger("firehose.db")

P = ParamSpec("P")
R = TypeVar("R")

OPEN_RETRY_MIN_S = 0.5
OPEN_RETRY_MAX_S = 15.0
CONNECT_TIMEOUT_S = 10.0
# Prepared statements each pooled connection keeps (asyncpg's default is 100). A snapshot's
# fresh load and its guarded upserts come in up to 64 shapes each, by the typed tables a
# batch has rows for (queries.statement_tables); with the queue's and the live stream's own
# statements that can pass 100, and a statement evicted is prepared again and planned anew
# (its first five runs with custom plans, ~1 ms of PostgreSQL's CPU more each). 64 shapes
# kept cost the server ~1.5 MB per connection (pg_backend_memory_contexts).
STATEMENT_CACHE_SIZE = 256
# The server is down, starting, shutting down or full: waiting helps. Authentication and
# "database does not exist" are PostgresErrors outside these classes: they fail at once.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, no socket file, timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # admin shutdown, crash shutdown, cannot connect now
    asyncpg.InsufficientResourcesError,  # too many connections
)


# What a query on a pooled connection raises while the server goes away or comes back:
# the above, a connection closed under it (InterfaceError), and asyncpg's "cannot switch to
# state N; another operation is in progress" (InternalClientError) on a connection that
# broke in the middle of an operation. Nothing was committed: the work is retried.
QUERY_RETRY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    *TRANSIENT_DB_ERRORS,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class DatabaseWaitStopped(Exception):
    """stop() was called while start-up was still waiting for the database."""


class Database:
    def __init__(self, pool: asyncpg.Pool, embedded: Any | None, dsn: str = "") -> None:
        self.pool = pool
        self._embedded = embedded
        # For a connection of its own (the readiness probe); holds the password: never log it.
        self.dsn = dsn

    @classmethod
    async def open(
        cls, settings: DatabaseSettings, *, stop: asyncio.Event | None = None
    ) -> Database:
        """Start (embedded) or reach the server, migrate, pool. Without `stop` one attempt
        (the CLI commands); with it, transient errors are retried until `stop` is set
        (then DatabaseWaitStopped)."""
        embedded = None
        dsn = settings.url
        if dsn is None:
            from firehose.storage.embedded import start_embedded

            pg_dir = settings.data_dir / "pg"
            log.info(
                "DATABASE_URL is not set: starting embedded PostgreSQL in %s", pg_dir.resolve()
            )
            embedded = start_embedded(pg_dir)
            dsn = embedded.dsn
            # The embedded server listens on a Unix socket whose directory pgserver picks, and
            # trusts local connections: its URI holds no password, and this line is how a user
            # finds the database (`psql '<uri>'`).
            log.info("embedded PostgreSQL ready: psql '%s'", embedded_uri(dsn))
        try:
            delay_s = OPEN_RETRY_MIN_S
            attempt = 1
            while True:
                try:
                    pool = await _connect(dsn, settings.pool_size)
                    break
                except TRANSIENT_DB_ERRORS as exc:
                    if stop is None:
                        raise
                    wait_s = random.uniform(delay_s / 2, delay_s)
                    log.warning(
                        "database not reachable (attempt %d, %s); retrying in %.1f s",
                        attempt,
                        redact_password(f"{type(exc).__name__}: {exc}", dsn),
                        wait_s,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait_s)
                    if stop.is_set():
                        raise DatabaseWaitStopped from None
                    delay_s = min(delay_s * 2, OPEN_RETRY_MAX_S)
                    attempt += 1
            if attempt > 1:
                log.info("database reachable after %d attempts", attempt)
        except BaseException:
            if embedded is not None:
                embedded.stop()
            raise
        return cls(pool, embedded, dsn)

    async def run(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Run `fn(conn, ...)` on a pooled connection."""
        async with self.pool.acquire() as conn:
            return await fn(conn, *args, **kwargs)

    async def close(self) -> None:
        try:
            await self.pool.close()
        finally:
            if self._embedded is not None:
                self._embedded.stop()


async def _connect(dsn: str, pool_size: int) -> asyncpg.Pool:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        applied = await migrate.migrate(conn)
    finally:
        await conn.close()
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=pool_size,
        timeout=CONNECT_TIMEOUT_S,
        reset=keep_session,
        statement_cache_size=STATEMENT_CACHE_SIZE,
    )
    return pool


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back to the pool as it is: no reset query.

    asyncpg's default resets every released connection with a round trip of four statements
    (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`): 24-52 µs of PostgreSQL's
    CPU and 24-196 µs of ours per release (acquire + `SELECT 1` + release, 5,000 times, three
    runs each way, load average 0.28-0.34). The backfill releases a connection a few times
    per repo (each batch, done, progress; a history-model repo holds ~100 records) and the
    live stream once per batch; bench/backfill.py moved within its run-to-run spread (four
    runs each way).
    Nothing here leaves session state on a pooled connection: settings are
    transaction-local (`set_config(..., true)`), the migrations' advisory lock is taken on
    a connection of its own, and there are no LISTENs or cursors (tests/test_storage_pool.py
    scans the code for them). asyncpg still rolls back a transaction left open before it
    calls this."""


def embedded_uri(dsn: str) -> str:
    """The embedded server's URI as a user types it (``postgresql://postgres@/atproto?host=
    /path``): pgserver writes an empty password (``postgres:@``); any real one is masked."""
    if urlsplit(dsn).password:
        return redact_password(dsn, dsn)
    return dsn.replace(":@", "@", 1)
