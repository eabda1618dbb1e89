"""Shared fixtures: a real PostgreSQL for every test that needs one.

* The server: `TEST_DATABASE_URL` (any database on it; we create our own next to it) if set,
  else an embedded PostgreSQL (pgserver) in a temp dir, tuned for tests (no fsync) and
  deleted at the end of the session.
* A template database migrated by OUR migrator (firehose.storage.migrate), built once per
  session; each test gets a fresh copy (`CREATE DATABASE ... TEMPLATE`, ~0.1 s), dropped at
  teardown.

Fixtures: `pg_admin_dsn` (session: DSN of the server's admin database), `pg_template`
(session: name of the migrated template), `pg_admin_conn` (session: an asyncpg connection to
the admin database), `new_database` (function: async factory of extra
fresh migrated databases, e.g. for a restart test), `db_dsn` (function: DSN of a fresh migrated
database), `conn` (function: an asyncpg connection to it, closed after the test).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from firehose.storage.migrate import migrate


def dsn_with_database(dsn: str, database: str) -> str:
    """`dsn` (a postgresql:// URI) pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of the test server's admin database (TEST_DATABASE_URL or an embedded server)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    tmp = Path(tempfile.mkdtemp(prefix="firehose-test-pg-"))
    server = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        # Durability is worthless for throw-away test data; skipping fsyncs makes every
        # CREATE DATABASE and commit much faster.
        server.psql(
            "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
            " ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();"
        )
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest_asyncio.fixture(scope="session")
async def pg_admin_conn(pg_admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _create_database(admin: asyncpg.Connection, name: str, template: str) -> None:
    sql = f"CREATE DATABASE {_quote_ident(name)} TEMPLATE {_quote_ident(template)}"
    for attempt in range(50):
        try:
            await admin.execute(sql)
            return
        except asyncpg.ObjectInUseError:
            # The template's last connection may take a moment to go away after close().
            if attempt == 49:
                raise
            await asyncio.sleep(0.05)


async def _drop_database(admin: asyncpg.Connection, name: str) -> None:
    await admin.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


@pytest_asyncio.fixture(scope="session")
async def pg_template(pg_admin_dsn: str, pg_admin_conn: asyncpg.Connection) -> AsyncIterator[str]:
    """Name of a database migrated by firehose.storage.migrate, used as template."""
    name = f"firehose_tmpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await pg_admin_conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    try:
        conn = await asyncpg.connect(dsn_with_database(pg_admin_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await _drop_database(pg_admin_conn, name)


@pytest_asyncio.fixture
async def new_database(
    pg_admin_dsn: str, pg_admin_conn: asyncpg.Connection, pg_template: str
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Factory: `await new_database()` -> DSN of a fresh migrated database;
    `await new_database(migrated=False)` -> an empty one. All dropped after the test."""
    created: list[str] = []

    async def make(*, migrated: bool = True) -> str:
        name = f"firehose_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        await _create_database(pg_admin_conn, name, pg_template if migrated else "template0")
        created.append(name)
        return dsn_with_database(pg_admin_dsn, name)

    try:
        yield make
    finally:
        for name in created:
            await _drop_database(pg_admin_conn, name)


@pytest_asyncio.fixture
async def db_dsn(new_database: Callable[..., Awaitable[str]]) -> str:
    """DSN of a fresh, migrated database of its own for this test."""
    return await new_database()


@pytest_asyncio.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to this test's fresh database."""
    connection = await asyncpg.connect(db_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A small asyncpg pool on this test's fresh database."""
    created = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
    try:
        yield created
    finally:
        await created.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzz budget actually spent: inputs tried per target (tests/fuzz/targets.py)."""
    import sys

    targets = sys.modules.get("fuzz.targets")
    if targets is None or not targets.TRIED:
        return  # no fuzz test ran in this session
    tried = targets.TRIED
    failed = [r for r in terminalreporter.stats.get("failed", []) if "test_fuzz_" in r.nodeid]
    parts = ", ".join(f"{name} {tried[name]}" for name in targets.TARGETS)
    terminalreporter.write_line(
        f"fuzz: {sum(tried.values())} inputs tried ({parts}), {len(failed)} failures"
    )
