"""Sharded workers end to end: WORKER_COUNT=3 worker subprocesses against one devnet.

How "no event applied by two workers" is proven: the rows do not say which worker wrote
them (no schema change for a test), so each worker first runs against a database OF ITS OWN.
There every row is that worker's: its database must hold exactly its shard of the truth
(records, tombstones, actors, typed tables; deleted accounts purged), no row of another
shard, and only its own cursor row. The shards partition the DIDs, so the three databases are
disjoint and their union is the whole truth. Then the same three workers run on ONE database,
which must equal the truth; each worker's `firehose_ops_total` there equals its count from the
solo run (ops are counted per committed batch, before any database guard), so in the shared
run each worker applied exactly its own shard's ops, no more. Every worker also reads and
counts every event and moves its cursor to the last seq, whatever the shard.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from support import (
    COLLECTION_TABLES,
    DevnetProcess,
    WorkerProcess,
    assert_matches_truth,
    did_of_uri,
    free_port,
    scrape_metrics,
    shard_truth,
    wait_for_cursor,
)

from firehose.live.batch import shard_of

pytestmark = pytest.mark.slow

SHARDS = 3
EVENTS = 10_000
SEED = "12"
CATCH_UP_TIMEOUT_S = 60.0


def _ops(metrics: str) -> dict[str, float]:
    ops: dict[str, float] = {}
    pattern = r'firehose_ops_total\{action="(\w+)",collection="[\w.]+"\} (\S+)'
    for action, n in re.findall(pattern, metrics):
        ops[action] = ops.get(action, 0.0) + float(n)
    return ops


def _events(metrics: str) -> dict[str, float]:
    """firehose_events_total by type."""
    found = re.findall(r"firehose_events_total\{type=\"(\w+)\"\} (\S+)", metrics)
    return {kind: float(n) for kind, n in found if float(n)}


async def _run_shards(tmp: Path, dsns: list[str], relay_url: str, last_seq: int) -> list[str]:
    """Worker i on dsns[i] from seq 0 until its cursor row reaches `last_seq`, then stopped
    with SIGTERM; returns each worker's /metrics text."""
    ports = [free_port() for _ in range(SHARDS)]
    workers = [
        WorkerProcess.start(
            tmp,
            dsns[i],
            relay_url,
            START_CURSOR="0",
            WORKER_COUNT=str(SHARDS),
            WORKER_ID=str(i),
            METRICS_PORT=str(ports[i]),
        )
        for i in range(SHARDS)
    ]
    try:
        await asyncio.gather(
            *(
                wait_for_cursor(
                    dsns[i],
                    last_seq,
                    worker=workers[i],
                    service=f"firehose:{i}",
                    timeout_s=CATCH_UP_TIMEOUT_S,
                )
                for i in range(SHARDS)
            )
        )
        metrics = [await scrape_metrics(port) for port in ports]
        for w in workers:
            assert w.terminate() == 0
        return metrics
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill9()


async def _assert_only_shard(dsn: str, shard: int) -> None:
    """Every DID-bearing row of this database belongs to `shard`; one cursor row, its own."""
    conn = await asyncpg.connect(dsn)
    try:
        dids = {r["did"] for r in await conn.fetch("SELECT DISTINCT did FROM records")}
        dids |= {r["did"] for r in await conn.fetch("SELECT did FROM actors")}
        dids |= {
            did_of_uri(r["uri"]) for r in await conn.fetch("SELECT uri FROM record_tombstones")
        }
        for table in COLLECTION_TABLES.values():
            dids |= {did_of_uri(r["uri"]) for r in await conn.fetch(f"SELECT uri FROM {table}")}
        assert dids, f"shard {shard} indexed nothing"
        strangers = sorted(d for d in dids if shard_of(d, SHARDS) != shard)
        assert not strangers, f"shard {shard} holds rows of other shards: {strangers[:3]}"
        services = [r["service"] for r in await conn.fetch("SELECT service FROM firehose_cursor")]
        assert services == [f"firehose:{shard}"], services
    finally:
        await conn.close()


async def test_three_shards_partition_the_truth(
    tmp_path: Path, db_dsn: str, new_database: Callable[..., Awaitable[str]]
) -> None:
    relay = DevnetProcess.start(tmp_path, "--seed", SEED, "--events", str(EVENTS), "--rate", "0")
    try:
        truth = relay.truth()
        last_seq = truth["last_seq"]
        # The traffic exercises every sharded path: a deleted account (purge) in every shard,
        # other statuses, handles.
        statuses = set(truth["statuses"].values())
        assert len(statuses) > 2, statuses
        deleted_in = {shard_of(d, SHARDS) for d, s in truth["statuses"].items() if s == "deleted"}
        assert deleted_in == set(range(SHARDS)), deleted_in
        assert truth["deleted"] and truth["handles"]

        # 1. Each worker alone on its own database: exactly its shard, nothing else.
        solo_dsns = [await new_database() for _ in range(SHARDS)]
        solo = await _run_shards(tmp_path, solo_dsns, relay.url, last_seq)
        assert {"commit", "identity", "account"} <= set(_events(solo[0])), solo[0][:2000]
        events = _events(solo[0])
        for i, dsn in enumerate(solo_dsns):
            await assert_matches_truth(
                dsn, shard_truth(truth, lambda did, i=i: shard_of(did, SHARDS) == i)
            )
            await _assert_only_shard(dsn, i)
            # Every worker reads every event, and counts each by its type (another shard's
            # is read only as far as its seq, decode_frame), and its cursor covers them all.
            assert _events(solo[i]) == events and sum(events.values()) >= last_seq * 0.99
            assert f"firehose_cursor {float(last_seq)}" in solo[i]

        # 2. The three together on one database: the union equals the truth, and each worker
        #    committed exactly the ops of its solo run (its shard's), so none applied another's.
        shared = await _run_shards(tmp_path, [db_dsn] * SHARDS, relay.url, last_seq)
        await assert_matches_truth(db_dsn, truth)
        for i in range(SHARDS):
            assert _ops(shared[i]) == _ops(solo[i]), i
            assert sum(_ops(solo[i]).values()) > 0, i
    finally:
        relay.stop()
