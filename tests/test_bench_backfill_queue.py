"""bench/backfill_queue.py: what claiming a repo and marking it done cost as a job goes on."""

from __future__ import annotations

import asyncpg

from bench.backfill_queue import _measure


async def test_the_queue_bench_works_through_its_share_and_reads_few_buffers(
    conn: asyncpg.Connection,
) -> None:
    result = await _measure(conn, repos=2_000, claim_size=10, fraction=0.5, autovacuum=False)
    assert result["bench"] == "queue" and not result["autovacuum"]
    assert len(result["stretches"]) == 10
    # Every stretch's claim and done mark, one more of each explained, counted as done.
    assert result["done"] == 1_000 + 10
    assert await conn.fetchval("SELECT count(*) FROM backfill_repos WHERE state = 'done'") == 1_010
    assert (
        await conn.fetchval("SELECT count(*) FROM backfill_repos WHERE state = 'in_progress'") == 0
    )
    for stretch in result["stretches"]:
        assert stretch["pg_us_per_repo"] >= 0 and stretch["claim_buffers"] > 0
        # sql/008: the done mark reads its own repo's entries, not one per repo done before.
        assert stretch["done_buffers"] < 40, stretch


def test_no_benchmark_script_hides_a_standard_library_module() -> None:
    # `python bench/x.py` puts bench/ first on sys.path: a bench/queue.py made every benchmark
    # import it as the standard library's `queue` (asyncio.to_thread failed in the backfill).
    import sys
    from pathlib import Path

    names = {p.stem for p in (Path(__file__).parents[1] / "bench").glob("*.py")}
    assert names and not names & sys.stdlib_module_names, names & sys.stdlib_module_names
