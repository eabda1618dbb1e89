"""CPU instructions per frame, event and record: a ruler that this machine's noise cannot bend.

Throughput on these 2 shared cores moves ±10-20 % between runs of the same code (see
docs/performance.md), so a change worth 5 % of CPU cannot be seen in records/s. This bench
counts the instructions the worker's pure work executes, under valgrind's callgrind, which
does not depend on load, caches or the clock: run it before and after a change to the hot
path, and compare.

Each workload runs twice in a child `python` under callgrind, with no items and with
`--items N`; the difference divided by N is the count per item (start-up and imports
cancel out). `PYTHONHASHSEED=0` keeps dict layouts, and so the counts, the same run to run.

* ``decode``: `decode_frame` over recorded devnet frames (bench/replay.py's cache): per frame;
* ``batch``: those events through `BatchBuilder` and `prepare_batch` (rows, JSON) in batches
  of 1,000, the worker's pure work after decoding: per event;
* ``apply``: those events through `BatchBuilder`, `prepare_steps` and `apply_prepared` in
  batches of 1,000 against an embedded PostgreSQL (a new database for each child run,
  started outside valgrind): per event, the worker's client side of its transactions
  (preparing the batch, asyncpg encoding the parameters and reading the results, the event
  loop); PostgreSQL's own work is not counted;
* ``car``: a real repository CAR (indigo's ``paul_staging.repo.car`` from
  ``../shared/atproto-vectors``, else the tests' fixture repo) streamed through
  `CarStreamReader`, its MST walked and each record decoded, again and again, the
  backfill's pure work before the rows: per record;
* ``snapshot``: the same CAR as the backfill takes a fresh repo: streamed into its
  `MemoryBlocks`, checked and walked (`_check_snapshot`), its records as `RecordWrite`s
  (`RepoSnapshot.writes`), then the rows and what the fresh load sends (`prepare`,
  `fresh_payload`: the records rows' COPY text and the typed rows' JSON): the backfill's
  whole pure work per record of a repo this size (185 records: one batch, by COPY).

These are instructions, not time: a cache miss costs none here and hundreds of cycles on
the machine, and valgrind runs SHA-256 without the CPU's SHA instructions, so hashing counts
more than it costs. Compare the same workload before and after, never workloads or machines.

    python bench/instructions.py [--workloads decode,batch,apply,car,snapshot] [--items 2000]

Prints a line per workload and a JSON line:

    {"bench": "instructions", "decode_per_item": ..., "batch_per_item": ..., ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firehose.model import Event

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAMES = (10_000, 500, 3)  # bench/replay.py cache: events, accounts, seed
BATCH_EVENTS = 1000
CHUNK_BYTES = 64 * 1024  # the backfill reads its download in chunks like these
REPO_CAR = ROOT.parent / "shared/atproto-vectors/indigo/testing/testdata/paul_staging.repo.car"
FIXTURE_CAR = (
    ROOT / "tests/fixtures/indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car"
)
WORKLOADS = ("decode", "batch", "apply", "car", "snapshot")
WARM_FRAMES = 200
_COLLECTED = re.compile(rb"Collected : (\d+)")


# --- the workloads (run inside the measured child) ----------------------------------------


def frames(count: int) -> list[bytes]:
    from bench.replay import ensure_cache, read_frames

    return read_frames(ensure_cache(*FRAMES), count)


def run_decode(frame_list: list[bytes]) -> int:
    from firehose.protocol.frames import decode_frame

    for frame in frame_list:
        decode_frame(frame)
    return len(frame_list)


def run_batch(events: list[Event]) -> int:
    from firehose.live.batch import BatchBuilder
    from firehose.storage.prepare import prepare_batch

    builder = BatchBuilder()
    for event in events:
        builder.add(event)
        if len(builder) >= BATCH_EVENTS:
            batch = builder.take()
            prepare_batch(batch, batch.heads)
    if len(builder):
        batch = builder.take()
        prepare_batch(batch, batch.heads)
    return len(events)


def run_apply(dsn: str, events: list[Event]) -> int:
    """`events` written as the worker writes them, in batches of BATCH_EVENTS, after one
    warm batch (the same events again: asyncpg's statement cache and the first round trips
    in both runs)."""
    import asyncpg
    import uvloop

    from firehose.live.batch import BatchBuilder
    from firehose.storage import prepare, writer

    async def apply(conn: asyncpg.Connection, chunk: list[Event]) -> None:
        builder = BatchBuilder()
        for event in chunk:
            builder.add(event)
        batch = builder.take()
        prepared = prepare.drain(prepare.prepare_steps(batch, batch.heads))
        await writer.apply_prepared(conn, prepared)

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await apply(conn, events[:WARM_FRAMES])
            for start in range(WARM_FRAMES, len(events), BATCH_EVENTS):
                await apply(conn, events[start : start + BATCH_EVENTS])
        finally:
            await conn.close()

    uvloop.run(run())
    return len(events) - WARM_FRAMES


def run_car(car: bytes, records: int) -> int:
    """Stream `car` through the backfill's reader and walker until `records` are decoded."""
    from firehose.protocol.car import CarStreamReader
    from firehose.protocol.cbor import decode_block, decode_record
    from firehose.protocol.mst import walk_mst

    done = 0
    while done < records:
        reader = CarStreamReader()
        blocks: dict[bytes, bytes] = {}
        for start in range(0, len(car), CHUNK_BYTES):
            for cid, block in reader.feed(car[start : start + CHUNK_BYTES]):
                blocks[cid] = block
        reader.close()
        assert reader.root_cid is not None
        commit = decode_block(blocks[reader.root_cid])
        for _key, cid in walk_mst(commit["data"], blocks.get):
            decode_record(blocks[cid])
            done += 1
            if done == records:
                break
    return done


def run_snapshot(car: bytes, records: int) -> int:
    """Take `car` as the backfill takes a fresh repo, whole, until `records` are prepared
    (backfill/download.py's fetch_repo after the HTTP, then backfill/repo_task.py's rows and
    snapshots.write_rows before the database)."""
    from backfill.blocks import MemoryBlocks
    from backfill.download import _check_snapshot, checked_snapshot
    from backfill.window import Window
    from firehose.protocol.car import CarStreamReader
    from firehose.protocol.cbor import decode_block
    from firehose.storage.prepare import ApplyStats
    from firehose.storage.snapshot_rows import snapshot_rows
    from firehose.storage.snapshots import fresh_payload

    window = Window(cutoff=None)
    done = 0
    while done < records:
        reader = CarStreamReader()
        spool = MemoryBlocks()
        for start in range(0, len(car), CHUNK_BYTES):
            for cid, block in reader.feed(car[start : start + CHUNK_BYTES]):
                spool.add(cid, block)
        reader.close()
        assert reader.root_cid is not None
        did = decode_block(spool.get(reader.root_cid) or b"")["did"]
        entries: list[tuple[str, bytes]] = []
        checked = _check_snapshot(spool, reader.root_cid, did, entries)
        snap = checked_snapshot(did, checked, spool, entries, len(car))
        items = [r for r in snap.items(window) if type(r) is tuple]
        items = items[: records - done]
        assert snap.head is not None
        prep = snapshot_rows(did, items, [snap.head], ApplyStats())
        fresh_payload(prep, continuing=False)
        snap.close()
        done += len(items)
    return done


def repo_car() -> bytes:
    return (REPO_CAR if REPO_CAR.exists() else FIXTURE_CAR).read_bytes()


def inner(workload: str, items: int, prepared: int, dsn: str = "") -> int:
    """The measured run: the set-up, the same in both runs (`prepared` frames read, and for
    `batch` decoded), then `items` items of `workload`."""
    from firehose.gctune import tune_gc

    tune_gc()  # as in the worker and the backfill
    if workload in ("car", "snapshot"):
        run = run_car if workload == "car" else run_snapshot
        car = repo_car()
        run(car, 1)  # warm: the same imports and caches in both runs
        gc.freeze()
        return run(car, items) if items else 0
    frame_list = frames(WARM_FRAMES + prepared)
    run_decode(frame_list[:WARM_FRAMES])  # warm the DID and NSID caches in both runs
    if workload == "decode":
        gc.freeze()
        return run_decode(frame_list[WARM_FRAMES : WARM_FRAMES + items])
    from firehose.protocol.frames import decode_frame

    events = [decode_frame(f) for f in frame_list[WARM_FRAMES:]]
    # The set-up's objects (thousands of decoded events) out of the collector's sight, as
    # the worker's start-up objects are (tune_gc). Otherwise a full collection over them
    # falls inside the measured part or not depending on every allocation a change adds:
    # ~100 more small objects per batch once read as +1,850 instructions per event.
    gc.freeze()
    if workload == "apply":
        return run_apply(dsn, events[: WARM_FRAMES + items])
    run_batch(events[:WARM_FRAMES])
    return run_batch(events[:items])


# --- the runner -----------------------------------------------------------------------------


def instructions(workload: str, items: int, prepared: int) -> int:
    """Instructions callgrind counted for one child run of `workload` with `items` items;
    for ``apply``, against a new embedded PostgreSQL of its own."""
    if workload != "apply":
        return _count(workload, items, prepared, [])
    import asyncio
    import tempfile

    import asyncpg

    from firehose.storage.embedded import start_embedded
    from firehose.storage.migrate import migrate

    async def migrated(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    with tempfile.TemporaryDirectory() as tmp:
        pg = start_embedded(Path(tmp) / "pg")
        try:
            asyncio.run(migrated(pg.dsn))
            return _count(workload, items, prepared, ["--dsn", pg.dsn])
        finally:
            pg.stop()


def _count(workload: str, items: int, prepared: int, extra: list[str]) -> int:
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--inner",
            workload,
            "--items",
            str(items),
            "--prepared",
            str(prepared),
            *extra,
        ],
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    found = _COLLECTED.findall(proc.stderr)
    if proc.returncode != 0 or not found:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{workload} under callgrind failed ({proc.returncode}): {tail}")
    return int(found[-1])


def per_item(workload: str, items: int) -> float:
    prepared = max(items, WARM_FRAMES) + (WARM_FRAMES if workload == "apply" else 0)
    with_items = instructions(workload, items, prepared)
    return (with_items - instructions(workload, 0, prepared)) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--inner", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.inner, args.items, args.prepared, args.dsn)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (Debian: apt-get install valgrind)")
    chosen = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(chosen) - set(WORKLOADS))
    limit = FRAMES[0] - 2 * WARM_FRAMES  # apply: warm frames, then a warm batch
    if unknown or not 1 <= args.items <= limit:
        sys.exit(f"workloads are {', '.join(WORKLOADS)}, and --items 1 to {limit}")
    if {"decode", "batch", "apply"} & set(chosen):
        # Built here, not in the first measured child: generating the cache (~0.6 ms per
        # event) counted in that child once gave "8,199,710 instructions per frame".
        frames(1)
    unit = {
        "decode": "frame",
        "batch": "event",
        "apply": "event",
        "car": "record",
        "snapshot": "record",
    }
    result: dict[str, float] = {"items": args.items}
    for workload in chosen:
        count = per_item(workload, args.items)
        result[f"{workload}_per_item"] = round(count)
        print(f"{workload}: {count:,.0f} instructions per {unit[workload]} ({args.items:,} items)")
    print(f"load average (not needed for these counts): {os.getloadavg()[0]:.2f}")
    print(json.dumps({"bench": "instructions", **result}))


if __name__ == "__main__":
    main()
