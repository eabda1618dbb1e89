"""bench/backfill.py --known: every repo the relay lists has a head before the backfill
starts, so that none is fresh and the run measures the guarded path."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from support import DevnetProcess

from bench.backfill import seed_heads


async def test_known_gives_every_listed_repo_a_head_older_than_its_commits(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    devnet = DevnetProcess.start(
        tmp_path, *("--accounts", "3", "--events", "10", "--repo-accounts", "4")
    )
    try:
        listed = {did for did, status in devnet.truth()["statuses"].items()}
        await conn.execute("TRUNCATE actors")
        assert await seed_heads(db_dsn, devnet.url) == len(listed)
    finally:
        devnet.stop()
    rows = await conn.fetch("SELECT did, rev, chain_rev FROM actors")
    assert {r["did"] for r in rows} == listed
    assert {(r["rev"], r["chain_rev"]) for r in rows} == {("2222222222222", "2222222222222")}
