"""Live-path benchmark: devnet frames as fast as the worker takes them.

A relay subprocess serves N devnet events; the worker runs in this process against a fresh
embedded PostgreSQL, starting at cursor 0. By default the relay is `bench/replay.py`, which
serves the devnet's frames from a cache file (generated once per arguments and devnet
source: generation costs ~0.6 ms per event) at almost no CPU cost, like a remote relay;
`--no-cache` uses the devnet relay itself (`--rate 0`: every frame generated before the
clock starts). Printed: committed events/s and records/s, p50/p99 read→commit latency, peak
RSS of this process (the worker), CPU seconds per 1000 events of the worker, PostgreSQL and
the relay, and decode-only events/s over the first 20,000 frames; then one JSON line.

The baseline (`--baseline-events`, default 10,000; 0 skips it) is the origin's write
pattern measured in the same run, on the same server, from the same frames: after the
worker's run the tables are emptied and the first N events are written one transaction per
event, each with its own cursor row, correctly: the same rows with the same guards (a
one-row guarded upsert per record and per typed row, the rev, tombstone and account guards
of queries.py), deletes with tombstones, repo heads, asynchronous commit like the worker's
(no fsync per event).
Printed: its events/s and CPU per event, and the worker's ratio to it.

Every throughput figure is claimed only on a quiet machine (bench.common.MachineLoad: at
most 1 core busy just before the bench started, at most 0.25 cores of other processes
during the run): otherwise a warning is printed in its place. CPU per event is printed
either way, with the load.

    python bench/live.py [--events 200000] [--accounts 1000] [--seed 3] [--no-cache]
                         [--baseline-events 10000] [--profile FILE] [--statements] [--waits]
                         [--shards N]

`--profile FILE` runs the worker under cProfile (slower; stats saved to FILE, top printed);
`--statements` times every SQL call of the worker by its first words (wall time, which on
this loopback is mostly PostgreSQL's own); `--waits` samples what PostgreSQL's backends run
and wait on while the worker's clock runs (bench/pgwaits.py). `--shards N` follows the
stream with N sharded worker processes (`python -m firehose run`, `WORKER_COUNT=N`) instead
of one in-process worker; `--shards 1` is one such process, to compare with
(bench/live_shards.py; the profile, statement and latency figures are then not taken).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psutil
import uvloop
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect

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
from bench.live_shards import run_shards  # noqa: E402
from bench.pgwaits import PgWaits  # noqa: E402
from bench.replay import cache_path, read_frames  # noqa: E402
from bench.sqltiming import StatementTimes  # noqa: E402
from firehose.live.batch import BatchBuilder  # noqa: E402
from firehose.model import Batch  # noqa: E402
from firehose.protocol.errors import ProtocolError  # noqa: E402
from firehose.protocol.frames import decode_frame  # noqa: E402
from firehose.settings import Settings  # noqa: E402
from firehose.storage import queries  # noqa: E402
from firehose.storage.embedded import start_embedded  # noqa: E402
from firehose.storage.prepare import prepare_batch  # noqa: E402
from firehose.storage.rows import with_record_json  # noqa: E402
from firehose.storage.writer import purge_accounts  # noqa: E402
from firehose.worker import Worker  # noqa: E402

DECODE_ONLY_FRAMES = 20_000
RSS_SAMPLE_S = 0.25
# How often the run's end (the last event committed) is looked for: the clock stops at the
# first look after it. Looked for every RSS_SAMPLE_S, the figures came in steps: four runs
# of two commits on 2026-12-05 all gave 20,336-20,353 events/s, earlier sessions' mostly
# 20,3xx, 21,4xx or 22,6xx (199,000 events over 9.78, 9.28 or 8.77 s). 100 looks a second
# cost the worker's loop about 1-2 ms of CPU a second.
END_POLL_S = 0.01


def start_devnet(tmp: Path, events: int, accounts: int, seed: int) -> tuple[subprocess.Popen, str]:
    log = tmp / "devnet.log"
    truth = tmp / "truth.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firehose.devnet", "--events", str(events), "--rate", "0",
         "--accounts", str(accounts), "--seed", str(seed), "--port", "0", "--truth", str(truth)],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    started = time.monotonic()
    while not truth.exists():
        if proc.poll() is not None:
            raise SystemExit(f"devnet failed:\n{log.read_text()}")
        time.sleep(0.2)
    url = re.search(r"listening on (ws://\S+)", log.read_text())
    assert url, log.read_text()
    print(f"devnet: {events:,} events generated in {time.monotonic() - started:.1f} s")
    return proc, url.group(1)


def start_replay(tmp: Path, events: int, accounts: int, seed: int) -> tuple[subprocess.Popen, str]:
    # The subprocess generates a missing cache itself: the generator's memory must not count
    # in this process's peak RSS.
    started = time.monotonic()
    log = tmp / "replay.log"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "replay.py"), "--events", str(events),
         "--accounts", str(accounts), "--seed", str(seed)],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    while (url := re.search(r"listening on (ws://\S+)", log.read_text())) is None:
        if proc.poll() is not None:
            raise SystemExit(f"replay relay failed:\n{log.read_text()}")
        time.sleep(0.1)
    print(f"replay relay: {events:,} cached events ready in {time.monotonic() - started:.1f} s")
    return proc, url.group(1)


def _ops_committed(worker: Worker) -> float:
    """Every firehose_ops_total sample (all actions and collections) summed."""
    return sum(
        sample.value
        for metric in worker.metrics.ops.collect()
        for sample in metric.samples
        if sample.name == "firehose_ops_total"
    )


def report_statements(times: StatementTimes, events: int) -> None:
    print(f"SQL wall time per 1000 events (of {events:,}):")
    for key, s, calls in times.top(len(times.seconds)):
        print(f"  {s * 1000 / events * 1000:8.1f} ms  {calls:6d} calls  {key}")


async def run_worker(
    dsn: str,
    relay_url: str,
    events: int,
    cpu_procs: dict[str, Callable[[], list[psutil.Process]]],
    waits: PgWaits | None = None,
) -> tuple[dict[str, float], MachineLoad]:
    settings = Settings.from_env(
        {"DATABASE_URL": dsn, "RELAY_URL": relay_url, "START_CURSOR": "0", "METRICS_PORT": "0"}
    )
    worker = Worker(settings, CollectorRegistry())
    worker.latency_samples = []
    proc = psutil.Process()
    peak_rss = proc.memory_info().rss
    task = asyncio.create_task(worker.run())
    # The clock starts at the first committed batch (start-up and migrations excluded).
    while worker.state.events_committed == 0:
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    t0, base = time.perf_counter(), worker.state.events_committed
    # Processes are listed again while the run goes on: a backend the worker opens later (a
    # second pool connection, the resync service's) counts as PostgreSQL, not as another
    # process's load on the machine, which would make the figures unclaimed.
    trackers = {name: CpuTracker(list_procs) for name, list_procs in cpu_procs.items()}
    load = MachineLoad()
    if waits is not None:
        waits.start()
    records0 = _ops_committed(worker)
    latency0 = len(worker.latency_samples)
    rss_at = t0
    while (worker.state.cursor or 0) < events:
        await asyncio.sleep(END_POLL_S)
        if time.perf_counter() >= rss_at:
            peak_rss = max(peak_rss, proc.memory_info().rss)
            rss_at = time.perf_counter() + RSS_SAMPLE_S
        if task.done():
            task.result()
    elapsed = time.perf_counter() - t0
    if waits is not None:
        waits.stop()
    cpu = {name: tracker.stop() for name, tracker in trackers.items()}
    load.stop(sum(cpu.values()))
    committed = worker.state.events_committed - base
    ops = _ops_committed(worker) - records0
    worker.stop()
    await task
    lat = sorted(worker.latency_samples[latency0:])  # steady state: the first batch excluded
    result = {
        "events_per_s": committed / elapsed,
        "records_per_s": ops / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "peak_rss_mb": peak_rss / 2**20,
        "elapsed_s": elapsed,
        "events": committed,
    }
    for name, seconds in cpu.items():
        result[f"cpu_ms_per_1k_events_{name}"] = seconds * 1000 / committed * 1000
    return result, load


def _row_upsert(table: str, columns: tuple[str, ...], guard: str) -> str:
    """A one-row guarded upsert: INSERT .. SELECT $1.. WHERE guard ON CONFLICT (uri) .."""
    cols = ", ".join(columns)
    values = ", ".join(f"${i + 1}" for i in range(len(columns)))
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != "uri")
    return (
        f"INSERT INTO {table} AS t ({cols}) SELECT {values} WHERE {guard} "
        f"ON CONFLICT (uri) DO UPDATE SET {sets}, indexed_at = now() "
        "WHERE t.rev < EXCLUDED.rev OR (t.rev = EXCLUDED.rev AND t.cid <> EXCLUDED.cid)"
    )


# The per-event writer's statements: one row each, with the guards of queries.py (the
# tombstone and account guards on records, the typed row only where its records row now
# holds exactly its rev and cid).
_RECORD_GUARD = (
    "coalesce((SELECT d.rev FROM record_tombstones d WHERE d.uri = $1) < $6, true)"
    " AND coalesce((SELECT a.status FROM actors a WHERE a.did = $2) <> 'deleted', true)"
)
_RECORD_UPSERT = _row_upsert("records", queries.RECORDS_COLUMN_NAMES, _RECORD_GUARD).replace(
    "$7", "$7::jsonb"
)
_TYPED_UPSERT = {
    t.name: _row_upsert(
        t.name,
        t.all_columns,
        "EXISTS (SELECT 1 FROM records r WHERE r.uri = $1 AND r.rev = $5 AND r.cid = $4)",
    )
    for t in queries.TYPED_TABLES.values()
}


async def write_one_event(conn: asyncpg.Connection, batch: Batch) -> None:
    """One event in its own transaction, the way a per-event indexer writes it: a guarded
    one-row upsert per record and per typed row, the deletes with their tombstones, the repo
    head and the cursor row."""
    p = prepare_batch(batch, batch.heads)
    rows = p.rows
    async with conn.transaction():
        if p.identities:
            await conn.execute(queries.ACTOR_IDENTITIES, p.identities_json)
        if p.accounts:
            await conn.execute(queries.ACTOR_ACCOUNTS, p.accounts_json)
        for e in p.accounts:
            if e.effective_status == "deleted":
                await purge_accounts(conn, [e.did])
        for record in rows.records:
            await conn.execute(_RECORD_UPSERT, *with_record_json(record))
        for name, typed in rows.typed.items():
            for row in typed:
                await conn.execute(_TYPED_UPSERT[name], *row)
        if rows.deletes[0]:
            await conn.execute(queries.DELETES_APPLY, *rows.deletes)
        if rows.heads:
            await conn.execute(
                queries.ACTOR_HEADS,
                [h[0] for h in rows.heads],
                [h[1] for h in rows.heads],
                [h[2] for h in rows.heads],
            )
        await conn.execute(queries.CURSOR_SAVE, "firehose", batch.cursor, batch.last_event_time)


async def run_baseline(
    dsn: str, frames: list[bytes], pg: Callable[[], list[psutil.Process]]
) -> tuple[dict[str, float], MachineLoad]:
    """The origin's write pattern: one transaction per event with its cursor (see above)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "TRUNCATE "
            + ", ".join(queries.REPO_TABLES)
            + ", record_tombstones, actors, firehose_cursor, repo_resyncs"
        )
        # Asynchronous commit, like the worker's batches: the comparison is about batching,
        # not about an fsync per event.
        await conn.execute("SET synchronous_commit = off")
        builder = BatchBuilder()
        me, pg_procs = psutil.Process(), pg()
        cpu0 = cpu_s([me]), cpu_s(pg_procs)
        load = MachineLoad()
        t0 = time.perf_counter()
        events = 0
        for frame in frames:
            try:
                builder.add(decode_frame(frame))
            except ProtocolError:
                continue
            batch = builder.take()
            if batch.events:
                await write_one_event(conn, batch)
                events += batch.events
        elapsed = time.perf_counter() - t0
        worker_s, pg_s = cpu_s([me]) - cpu0[0], cpu_s(pg_procs) - cpu0[1]
        load.stop(worker_s + pg_s)
    finally:
        await conn.close()
    return {
        "baseline_events": events,
        "baseline_events_per_s": events / elapsed,
        "baseline_cpu_ms_per_1k_events_worker": worker_s * 1e6 / events,
        "baseline_cpu_ms_per_1k_events_postgres": pg_s * 1e6 / events,
    }, load


async def fetch_frames(relay_url: str, n: int) -> list[bytes]:
    frames: list[bytes] = []
    url = f"{relay_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    async with connect(url, max_size=None, compression=None) as ws:
        while len(frames) < n:
            message = await ws.recv()
            assert isinstance(message, bytes)
            frames.append(message)
    return frames


def decode_only(frames: list[bytes]) -> float:
    t0 = time.perf_counter()
    for frame in frames:
        decode_frame(frame)
    return len(frames) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-cache", action="store_true", help="serve from the devnet relay")
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=10_000,
        help="one transaction per event (0: skip)",
    )
    parser.add_argument("--profile", metavar="FILE", help="cProfile the worker into FILE")
    parser.add_argument("--statements", action="store_true", help="time each SQL statement")
    parser.add_argument(
        "--waits", action="store_true", help="sample what PostgreSQL's backends wait on"
    )
    parser.add_argument(
        "--shards",
        type=int,
        help="N worker processes, WORKER_COUNT=N (1: one `firehose run`, not in-process)",
    )
    args = parser.parse_args()
    if args.shards is not None and not 1 <= args.shards <= 64:
        parser.error("--shards is 1 to 64")
    if args.shards is not None and (args.profile or args.statements):
        parser.error("--profile and --statements measure the in-process worker: not with --shards")
    load_at_start()  # before the bench loads the machine itself
    statements = StatementTimes() if args.statements else None
    if statements is not None:
        statements.install()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = start_devnet if args.no_cache else start_replay
        relay, url = start(tmp, args.events, args.accounts, args.seed)
        pg = start_embedded(tmp / "pg")
        try:
            cpu_procs = {
                "worker": lambda: [psutil.Process()],
                "postgres": lambda: postgres_processes(tmp / "pg"),
                "relay": lambda: [psutil.Process(relay.pid)],
            }
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            waits = PgWaits(pg.dsn) if args.waits else None
            if args.shards is not None:
                result, load = uvloop.run(
                    run_shards(tmp, pg.dsn, url, args.events, args.shards, cpu_procs)
                )
            else:
                result, load = uvloop.run(run_worker(pg.dsn, url, args.events, cpu_procs, waits))
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            wanted = max(DECODE_ONLY_FRAMES, min(args.baseline_events, args.events))
            if args.no_cache:
                frames = uvloop.run(fetch_frames(url, wanted))
            else:
                path = cache_path(args.events, args.accounts, args.seed)
                frames = read_frames(path, wanted)
            result["decode_only_events_per_s"] = decode_only(frames[:DECODE_ONLY_FRAMES])
            baseline_load = None
            if args.baseline_events > 0:
                base, baseline_load = uvloop.run(
                    run_baseline(pg.dsn, frames[: args.baseline_events], cpu_procs["postgres"])
                )
                result.update(base)
                result["ratio_to_baseline"] = (
                    result["events_per_s"] / result["baseline_events_per_s"]
                )
        finally:
            pg.stop()
            relay.terminate()
    print(f"committed: {result['events']:,} events in {result['elapsed_s']:.1f} s")
    print(load.describe())
    print(claim(load, f"events/s committed: {result['events_per_s']:,.0f}"))
    print(claim(load, f"records/s committed: {result['records_per_s']:,.0f}"))
    if "p50_ms" in result:
        p50, p99 = result["p50_ms"], result["p99_ms"]
        print(f"read->commit latency: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        print(f"peak RSS (worker process): {result['peak_rss_mb']:.0f} MB")
    else:
        rss = result["peak_rss_mb"]
        print(f"peak RSS ({args.shards} worker process(es) together): {rss:.0f} MB")
    print(
        "CPU µs per event: "
        + ", ".join(
            f"{name} {result[f'cpu_ms_per_1k_events_{name}']:.1f}"
            for name in ("worker", "postgres", "relay")
        )
    )
    print(f"decode-only events/s: {result['decode_only_events_per_s']:,.0f}")
    if baseline_load is not None:
        both = baseline_load if not baseline_load.quiet else load
        print(
            f"baseline, one transaction per event ({result['baseline_events']:,} events): "
            f"CPU µs per event worker {result['baseline_cpu_ms_per_1k_events_worker']:.1f}, "
            f"postgres {result['baseline_cpu_ms_per_1k_events_postgres']:.1f}; "
            + baseline_load.describe()
        )
        print(claim(baseline_load, f"baseline events/s: {result['baseline_events_per_s']:,.0f}"))
        print(claim(both, f"ratio to the baseline: {result['ratio_to_baseline']:.1f}x"))
    if statements is not None:
        report_statements(statements, int(result["events"]))
    if waits is not None:
        waits.report()
    if args.profile:
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    fields = {k: round(v, 2) for k, v in result.items()}
    fields.update(load.fields())
    if baseline_load is not None:
        fields.update({f"baseline_{k}": v for k, v in baseline_load.fields().items()})
    print(json.dumps({"bench": "live", **fields}))


if __name__ == "__main__":
    main()
