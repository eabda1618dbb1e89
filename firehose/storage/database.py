"""The worker's handle on PostgreSQL: embedded or external, migrated, pooled.

Without `DATABASE_URL` the worker starts the embedded PostgreSQL (pgserver) in `DATA_DIR`
and says so in the log; the same data survives a restart. Migrations are applied at
start-up under an advisory lock, so several workers may start at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg

from firehose.settings import DatabaseSettings
from firehose.storage import migrate

log = logging.getLogger("firehose.db")

P = ParamSpec("P")
R = TypeVar("R")


class Database:
    def __init__(self, pool: asyncpg.Pool, embedded: Any | None, dsn: str = "") -> None:
        self.pool = pool
        self._embedded = embedded
        # For a connection of its own (the readiness probe); holds the password: never log it.
        self.dsn = dsn

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Database:
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
        try:
            conn = await asyncpg.connect(dsn)
            try:
                applied = await migrate.migrate(conn)
            finally:
                await conn.close()
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=settings.pool_size)
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
