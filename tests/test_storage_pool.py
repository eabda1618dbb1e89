"""The worker's pool releases connections without asyncpg's reset query (database.keep_session):
what that relies on, and what asyncpg still does on release. Real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from firehose.settings import DatabaseSettings
from firehose.storage.database import Database

ROOT = Path(__file__).resolve().parents[1]
# A session-level SET / RESET / LISTEN / DECLARE CURSOR / advisory lock in an SQL string of the
# product. `SET LOCAL` and `set_config(..., true)` are transaction-local; `UPDATE ... SET` and
# `ON CONFLICT ... DO UPDATE SET` are no session settings.
_SESSION_STATE = re.compile(
    r"""["'](?:\s*)(?:SET\s+(?!LOCAL\b)\w+|RESET\s+\w+|LISTEN\s|DECLARE\s+\w+\s+CURSOR)"""
    r"""|set_config\([^)]*,\s*false\)|pg_advisory_lock\(""",
)


def test_no_session_state_on_pooled_connections() -> None:
    """The one session-level statement is the migrations' advisory lock, on a connection that
    is not pooled (firehose/storage/migrate.py)."""
    found = []
    for package in ("firehose", "backfill"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "devnet" in path.parts:
                continue
            for m in _SESSION_STATE.finditer(path.read_text()):
                found.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()[:60]}")
    assert found == ["firehose/storage/queries.py: pg_advisory_lock("], found


def test_the_pattern_sees_session_state() -> None:
    """Not vacuous: the pattern matches what it is meant to refuse, and not what is fine."""
    for bad in (
        '"SET search_path = x"',
        "'RESET ALL'",
        '"LISTEN ch"',
        "set_config('a', 'b', false)",
    ):
        assert _SESSION_STATE.search(bad), bad
    for fine in ('"SET LOCAL x = 1"', "UPDATE t SET a = 1", "set_config('a', 'b', true)"):
        assert not _SESSION_STATE.search(fine), fine


@pytest.fixture
async def database(db_dsn: str, tmp_path: Path) -> Database:
    db = await Database.open(DatabaseSettings(url=db_dsn, data_dir=tmp_path, pool_size=1))
    try:
        yield db
    finally:
        await db.close()


async def test_release_keeps_the_session_and_rolls_back(database: Database) -> None:
    pool = database.pool
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
        await conn.execute("SELECT set_config('application_name', 'kept', false)")
        tr = conn.transaction()
        await tr.start()
        await conn.execute("CREATE TEMP TABLE left_open (x int)")  # left in the transaction
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid  # the same session (pool of one)
        # No reset query ran: a session setting survives the release ...
        assert await conn.fetchval("SHOW application_name") == "kept"
        # ... but the transaction left open was rolled back, as asyncpg always does.
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
