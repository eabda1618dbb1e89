"""PostgreSQL's ceiling for this schema: how many records/s the database itself can take.

The speed targets of the live path (20,000 events/s) and of the backfill (50,000 records/s)
both end in the same tables: every record is one `records` row (jsonb, primary key, the
(collection, created_at) index) plus one row of its typed table (primary key + one index).
This benchmark takes the worker out of the picture: rows are built BEFORE the clock starts,
then written four ways, each on freshly emptied tables, in one run (compare the ratios; the
machine is shared and noisy):

  copy/1, copy/2   binary COPY straight into records + the typed tables, no guards, on one
                   and on two connections (two did shards): the fastest write there is,
                   correct only for tables known to be empty;
  apply/1, apply/2 the worker's own transaction (firehose.storage.writer.apply_prepared:
                   rev guards, tombstone and account guards, cursor), rows prepared in
                   advance.

For each: records/s, and CPU µs per record of PostgreSQL's processes and of this client.
The last lines turn them into the most records/s the 2 cores can give when the worker's
own CPU per record (decode, rows) is added: `--worker-us` (default: the measured live path
figures in docs/performance.md). One JSON line at the end.

    python bench/pg_ceiling.py [--records 100000] [--batch 5000] [--worker-us 125]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    CpuTracker,
    MachineLoad,
    claim,
    cpu_s,
    load_at_start,
    postgres_processes,
)
from bench.storage import synthetic  # noqa: E402
from firehose.model import Action, Batch  # noqa: E402
from firehose.storage import queries  # noqa: E402
from firehose.storage.embedded import start_embedded  # noqa: E402
from firehose.storage.migrate import migrate  # noqa: E402
from firehose.storage.prepare import ApplyStats, PreparedBatch, prepare, prepare_batch  # noqa: E402
from firehose.storage.rows import with_record_json  # noqa: E402
from firehose.storage.writer import apply_prepared  # noqa: E402

CORES = 2
TYPED_COLUMNS = {t.name: t.all_columns for t in queries.TYPED_TABLES.values()}

Chunk = tuple[list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]


def build(n: int, batch: int, shards: int) -> tuple[list[list[Chunk]], list[list[PreparedBatch]]]:
    """Per shard (did hash), the COPY chunks and the prepared batches of the same records."""
    writes = [w for w in synthetic(n) if w.action != Action.DELETE]
    by_shard: list[list[Any]] = [[] for _ in range(shards)]
    for w in writes:
        by_shard[hash(w.did) % shards].append(w)
    copies: list[list[Chunk]] = []
    applies: list[list[PreparedBatch]] = []
    for shard in by_shard:
        chunks: list[Chunk] = []
        prepared: list[PreparedBatch] = []
        for i in range(0, len(shard), batch):
            part = shard[i : i + batch]
            rows = prepare(Batch(writes=part), ApplyStats())
            chunks.append(([with_record_json(r) for r in rows.records], rows.typed))
            prepared.append(prepare_batch(Batch(writes=part, cursor=i + len(part))))
        copies.append(chunks)
        applies.append(prepared)
    return copies, applies


async def copy_shard(conn: asyncpg.Connection, chunks: list[Chunk]) -> None:
    for records, typed in chunks:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "records", records=records, columns=queries.RECORDS_COLUMN_NAMES
            )
            for table, rows in typed.items():
                await conn.copy_records_to_table(table, records=rows, columns=TYPED_COLUMNS[table])


async def apply_shard(conn: asyncpg.Connection, batches: list[PreparedBatch], shard: int) -> None:
    for prepared in batches:
        await apply_prepared(conn, prepared, service=f"firehose:{shard}")


async def measure(
    conns: list[asyncpg.Connection], mode: str, work: list[Any], pg_dir: Path
) -> dict[str, float]:
    await conns[0].execute(
        "TRUNCATE " + ", ".join(queries.REPO_TABLES) + ", record_tombstones, actors"
    )
    await conns[0].execute("CHECKPOINT")  # each mode starts with the same clean WAL state
    records = sum(len(c[0]) for shard in work for c in shard) if mode == "copy" else 0
    if mode == "apply":
        records = sum(len(p.rows.records) for shard in work for p in shard)
    me = psutil.Process()
    client0 = me.cpu_times()
    pg_cpu = CpuTracker(lambda: postgres_processes(pg_dir))
    t0 = time.perf_counter()
    if mode == "copy":
        await asyncio.gather(*(copy_shard(c, w) for c, w in zip(conns, work, strict=False)))
    else:
        await asyncio.gather(
            *(apply_shard(c, w, i) for i, (c, w) in enumerate(zip(conns, work, strict=False)))
        )
    elapsed = time.perf_counter() - t0
    pg_s = pg_cpu.stop()
    client1 = me.cpu_times()
    client_s = (client1.user + client1.system) - (client0.user + client0.system)
    return {
        "records": records,
        "records_per_s": round(records / elapsed),
        "pg_us_per_record": round(pg_s / records * 1e6, 1),
        "client_us_per_record": round(client_s / records * 1e6, 1),
    }


async def run(dsn: str, pg_dir: Path, n: int, batch: int) -> dict[str, Any]:
    conns = [await asyncpg.connect(dsn) for _ in range(2)]
    try:
        await migrate(conns[0])
        results: dict[str, Any] = {}
        for shards in (1, 2):
            copies, applies = build(n, batch, shards)
            for mode, work in (("copy", copies), ("apply", applies)):
                results[f"{mode}/{shards}"] = await measure(conns[:shards], mode, work, pg_dir)
        return results
    finally:
        for c in conns:
            await c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument(
        "--worker-us",
        type=float,
        default=125.0,
        help="the worker's whole CPU µs per record (bench/live.py: ~125; bench/backfill.py: ~58)",
    )
    args = ap.parse_args()
    load_at_start()
    tmp = Path(tempfile.mkdtemp(prefix="firehose-ceiling-"))
    embedded = start_embedded(tmp / "pg", database="bench")
    try:
        pg_cpu = CpuTracker(lambda: postgres_processes(tmp / "pg"))
        load = MachineLoad()
        cpu0 = cpu_s([psutil.Process()])
        results = asyncio.run(run(embedded.dsn, tmp / "pg", args.records, args.batch))
        load.stop(cpu_s([psutil.Process()]) - cpu0 + pg_cpu.stop())
    finally:
        embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(load.describe())
    for mode, r in results.items():
        print(
            claim(load, f"{mode:8} {r['records_per_s']:>7,} records/s")
            + f"   PostgreSQL {r['pg_us_per_record']:6.1f}"
            f" µs CPU/record   client {r['client_us_per_record']:6.1f} µs CPU/record"
        )
    # CPU is the bound on a 2-core machine: every record costs PostgreSQL's CPU plus the
    # worker's own (receive, decode, rows and its database client; measured whole by
    # bench/live.py and bench/backfill.py), whatever the pipelining, so
    # records/s <= cores / (pg + worker) µs.
    bounds = {}
    for mode in ("copy/2", "apply/2"):
        r = results[mode]
        bound = CORES * 1e6 / (r["pg_us_per_record"] + args.worker_us)
        bounds[mode] = round(bound)
        print(
            f"bound with {mode} writes and {args.worker_us:.0f} µs of worker CPU per record: "
            f"{bound:,.0f} records/s on {CORES} cores"
        )
    print(
        json.dumps(
            {
                "bench": "pg_ceiling",
                "cpu_count": os.cpu_count(),
                "worker_us": args.worker_us,
                "bounds": bounds,
                **results,
                **load.fields(),
            }
        )
    )


if __name__ == "__main__":
    main()
