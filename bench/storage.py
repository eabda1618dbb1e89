"""Storage benchmark: synthetic record writes through apply_batch() into PostgreSQL.

    python bench/storage.py [--records 100000] [--batch 5000] [--dsn postgresql://...]

Without --dsn (or DATABASE_URL) it starts an embedded PostgreSQL in a temp dir. Each run uses a
fresh database. The mix is roughly the live network's: 60% likes, 15% follows, 15% posts
(with facets, replies, embeds), 5% reposts and 5% deletes of earlier likes. Prints a human
line and a JSON line {"bench": "storage", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.common import (
    CpuTracker,
    MachineLoad,
    claim,
    cpu_s,
    load_at_start,
    postgres_processes,
)
from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, Batch, RecordWrite
from firehose.storage.migrate import migrate
from firehose.storage.prepare import ApplyStats
from firehose.storage.writer import apply_batch


def synthetic(n: int, seed: int = 1) -> list[RecordWrite]:
    rnd = random.Random(seed)
    dids = [f"did:plc:{rnd.getrandbits(100):025x}" for _ in range(max(10, n // 20))]
    base = 1_700_000_000_000_000
    likes: list[RecordWrite] = []
    out: list[RecordWrite] = []
    for i in range(n):
        did = rnd.choice(dids)
        rev = tid(base + i)
        rkey = tid(base * 2 + i)
        created = f"2024-05-{1 + i % 28:02d}T12:{i % 60:02d}:{(i * 7) % 60:02d}.{i % 1000:03d}Z"
        r = rnd.random()
        subject = f"at://{rnd.choice(dids)}/app.bsky.feed.post/{tid(base + rnd.randrange(n))}"
        if r < 0.60:
            rec: dict[str, Any] = {
                "$type": "app.bsky.feed.like",
                "subject": {"uri": subject, "cid": "bafyreib" + "a" * 51},
                "createdAt": created,
            }
            w = RecordWrite(
                did, "app.bsky.feed.like", rkey, rev, Action.CREATE, "bafyrei" + rkey, rec
            )
            likes.append(w)
        elif r < 0.75:
            rec = {
                "$type": "app.bsky.graph.follow",
                "subject": rnd.choice(dids),
                "createdAt": created,
            }
            w = RecordWrite(
                did, "app.bsky.graph.follow", rkey, rev, Action.CREATE, "bafyrei" + rkey, rec
            )
        elif r < 0.90:
            rec = {
                "$type": "app.bsky.feed.post",
                "text": f"hello @someone #tag{i % 50} https://example.com/{i} " * 2,
                "langs": ["en"],
                "createdAt": created,
                "facets": [
                    {
                        "index": {"byteStart": 6, "byteEnd": 14},
                        "features": [
                            {"$type": "app.bsky.richtext.facet#mention", "did": rnd.choice(dids)}
                        ],
                    },
                    {
                        "index": {"byteStart": 15, "byteEnd": 20},
                        "features": [
                            {"$type": "app.bsky.richtext.facet#tag", "tag": f"tag{i % 50}"}
                        ],
                    },
                ],
            }
            if rnd.random() < 0.3:
                ref = {"uri": subject, "cid": "bafyreib" + "a" * 51}
                rec["reply"] = {"root": ref, "parent": ref}
            if rnd.random() < 0.2:
                rec["embed"] = {
                    "$type": "app.bsky.embed.images",
                    "images": [
                        {
                            "alt": "",
                            "image": {
                                "$type": "blob",
                                "ref": {"$link": "bafkrei" + rkey},
                                "mimeType": "image/jpeg",
                                "size": 1234,
                            },
                        }
                    ],
                }
            w = RecordWrite(
                did, "app.bsky.feed.post", rkey, rev, Action.CREATE, "bafyrei" + rkey, rec
            )
        elif r < 0.95 or not likes:
            rec = {
                "$type": "app.bsky.feed.repost",
                "subject": {"uri": subject, "cid": "bafyreib" + "a" * 51},
                "createdAt": created,
            }
            w = RecordWrite(
                did, "app.bsky.feed.repost", rkey, rev, Action.CREATE, "bafyrei" + rkey, rec
            )
        else:
            old = likes[rnd.randrange(len(likes))]
            w = RecordWrite(old.did, old.collection, old.rkey, rev, Action.DELETE)
        out.append(w)
    return out


async def _stream(
    conn: asyncpg.Connection, writes: list[RecordWrite], batch_size: int, service: str
) -> tuple[ApplyStats, list[float]]:
    total = ApplyStats()
    latencies = []
    for i in range(0, len(writes), batch_size):
        chunk = writes[i : i + batch_size]
        b0 = time.perf_counter()
        total.add(
            await apply_batch(conn, Batch(writes=chunk, cursor=i + len(chunk)), service=service)
        )
        latencies.append(time.perf_counter() - b0)
    return total, latencies


async def run(dsn: str, n: int, batch_size: int, connections: int = 1) -> dict[str, Any]:
    writes = synthetic(n)
    # Like sharded workers (invariant 3): each connection gets the repos of one did hash shard.
    shards: list[list[RecordWrite]] = [[] for _ in range(connections)]
    for w in writes:
        shards[hash(w.did) % connections].append(w)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    conn = conns[0]
    try:
        await migrate(conn)
        for c in conns:  # warm-up: statement cache, staging tables
            await apply_batch(c, Batch(writes=synthetic(100, seed=2), cursor=0), service="warmup")
        await conn.execute("TRUNCATE records, likes, posts, follows, reposts, actors")
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                _stream(c, s, batch_size, f"firehose:{i}")
                for i, (c, s) in enumerate(zip(conns, shards, strict=True))
            )
        )
        elapsed = time.perf_counter() - t0
        total = ApplyStats()
        latencies: list[float] = []
        for stats, lat in results:
            total.add(stats)
            latencies += lat
        counts = {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}")  # constant table names
            for t in ("records", "posts", "likes", "follows", "reposts", "record_tombstones")
        }
    finally:
        for c in conns:
            await c.close()
    latencies.sort()
    return {
        "bench": "storage",
        "records": n,
        "batch": batch_size,
        "connections": connections,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(n / elapsed),
        "batch_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "batch_max_ms": round(latencies[-1] * 1000, 1),
        "upserted": total.upserted,
        "typed": total.typed,
        "deleted": total.deleted,
        "skipped": total.skipped,
        "tables": counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=1, help="parallel did shards")
    ap.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    args = ap.parse_args()
    load_at_start()

    tmp = None
    embedded = None
    dsn = args.dsn
    if dsn is None:
        from firehose.storage.embedded import start_embedded

        tmp = Path(tempfile.mkdtemp(prefix="firehose-bench-"))
        embedded = start_embedded(tmp / "pg", database="bench")
        dsn = embedded.dsn
    try:
        # Other processes' CPU is the machine's busy CPU less this process's and, when it is
        # ours, the embedded server's (an external server's CPU counts as other processes').
        pg_cpu = CpuTracker(lambda: postgres_processes(tmp / "pg")) if tmp is not None else None
        load = MachineLoad()
        cpu0 = cpu_s([psutil.Process()])
        result = asyncio.run(run(dsn, args.records, args.batch, args.connections))
        load.stop(cpu_s([psutil.Process()]) - cpu0 + (pg_cpu.stop() if pg_cpu else 0.0))
        result.update(load.fields())
    finally:
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(load.describe())
    print(
        claim(
            load,
            f"storage: {result['records']} records in batches of {result['batch']} "
            f"on {result['connections']} connection(s): "
            f"{result['seconds']} s, {result['rows_per_s']} rows/s "
            f"(batch p50 {result['batch_p50_ms']} ms, max {result['batch_max_ms']} ms)",
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
