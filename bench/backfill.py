"""Backfill benchmark: devnet repos downloaded, walked and written as fast as it goes.

A devnet subprocess serves REPOS pre-populated repos of RECORDS records each (built before
the clock starts: ~45 s for 1,000 x 500 on 2 cores; nothing is cached). The backfill runs
against a fresh embedded PostgreSQL, BACKFILL_DAYS=-1 (every record is written), profile
`unthrottled` unless told otherwise, either in this process (default: `BackfillService`
exactly as `firehose backfill run` builds it, so cProfile can look inside) or as a real
`python -m firehose backfill run` subprocess (`--subprocess`). The clock runs from the start
of the service (its `Database.open`: the new database's migrations count) to the job's
completion; in-process, the modules are loaded before it starts, as in a process that starts a
backfill, and with `--subprocess` the interpreter's start counts too.

`--processes N` sets BACKFILL_PROCESSES (default: the profile's; `unthrottled` takes one
process per core, backfill/helpers.py): the backfill's figures then include its helper
processes.

Printed: records/s and repos/s committed, peak RSS of the backfill process and its helpers
together (psutil, every 0.1 s), CPU seconds of the backfill (helpers included), PostgreSQL
and the devnet and CPU µs per record of the backfill and PostgreSQL, the WAL written, its
writes and syncs (pg_stat_wal) and the data pages PostgreSQL wrote out of its shared buffers,
extended and read back (pg_stat_io), the tables' and indexes' size when it ends, the machine's
load; then one JSON line {"bench": "backfill", ...}. `--timeline` prints the records committed
in each half second of the clock (the start's ramp, the steady rate, the tail).
Throughput is claimed only on a quiet machine (bench.common.MachineLoad: at most 1 core busy
just before the bench started, at most 0.25 cores of other processes during the run);
otherwise a warning is printed in its place. CPU per record is printed either way.

`--history-model N` backfills N accounts of the devnet's history model instead (repos grown
commit by commit over a year, realistic MSTs and record mix, from a few records to ~2,000:
firehose/devnet/model.py) rather than the flat pre-populated repos. `--guarded` turns the
COPY load of fresh repos off (firehose/storage/fresh.py), so that one machine can compare
both write paths run after run.

    python bench/backfill.py [--repos 1000] [--records 500] [--seed 5] [--profile-name P]
                             [--history-model N] [--guarded] [--known] [--processes N]
                             [--subprocess] [--cprofile FILE] [--statements] [--waits]
                             [--timeline]

`--known` first gives every repo the relay lists a head in `actors`, older than any of its
commits, as a live stream leaves a repo it has seen a commit of: no repo is fresh, and every
snapshot takes the guarded path, from its first batch (the claim says the repo has a head).
That is a window backfill behind a running live stream, where most repos are known.

`--cprofile FILE` runs the in-process backfill under cProfile (slower; stats saved to FILE,
top printed); `--statements` times every SQL call of the backfill by its first words (wall
time, which on this loopback is mostly PostgreSQL's own); `--waits` samples what
PostgreSQL's backends run and wait on while the clock runs (bench/pgwaits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backfill.settings import BackfillSettings  # noqa: E402
from bench.common import (  # noqa: E402
    CpuTracker,
    MachineLoad,
    backfill_env,
    children_cpu_s,
    claim,
    cpu_s,
    load_at_start,
    postgres_processes,
    start_history_devnet,
)
from bench.pgwaits import PgWaits  # noqa: E402
from bench.sqltiming import StatementTimes  # noqa: E402
from firehose.storage.embedded import start_embedded  # noqa: E402

RSS_SAMPLE_S = 0.1
# Listing a process's children reads every /proc/<pid>/stat on the machine (1.7 ms with 65
# processes): ten times a second, in the measured process, it took the backfill's own thread
# a few % of its CPU and the GIL (py-spy). The helpers start with the job and live until its
# end, so the list is refreshed only this often; their RSS is still read every RSS_SAMPLE_S.
CHILDREN_LIST_S = 2.0


class PeakRss:
    """Peak RSS of one process and its backfill helper processes together (BACKFILL_PROCESSES,
    backfill/helpers.py), sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        helpers: list[psutil.Process] = []
        listed_at = -CHILDREN_LIST_S
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            if time.monotonic() - listed_at >= CHILDREN_LIST_S:
                helpers, listed_at = self._helpers(), time.monotonic()
            for child in helpers:
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.peak = max(self.peak, rss)
            self._stop.wait(RSS_SAMPLE_S)

    def _helpers(self) -> list[psutil.Process]:
        found = []
        for child in self.proc.children():
            with contextlib.suppress(psutil.Error):
                if _is_helper(child):
                    found.append(child)
        return found

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _is_helper(proc: psutil.Process) -> bool:
    return proc.cmdline()[-2:] == ["backfill", "helper"]


def report_statements(times: StatementTimes, elapsed_s: float) -> None:
    print(f"SQL wall time (of {elapsed_s:.1f} s; calls overlap across connections):")
    for key, s, calls in times.top(12):
        print(f"  {s:7.2f} s  {calls:7d} calls  {key}")


async def job_numbers(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1")
        count = await conn.fetchval("SELECT count(*) FROM records")
        # What the run wrote to the WAL (new database: the migrations' few kB included), and
        # how much of it was full-page images (a page's first change after a checkpoint).
        wal = await conn.fetchrow(
            "SELECT wal_records, wal_fpi, wal_bytes, wal_write, wal_sync FROM pg_stat_wal"
        )
        io = await conn.fetchrow(PAGES_IO)
        sizes = await conn.fetchrow(SIZES)
        out = {**dict(row), **dict(wal), **dict(io), **dict(sizes), "records_in_table": count}
        return out if row else {}
    finally:
        await conn.close()


TIMELINE_BUCKET_S = 0.5


async def done_timeline(dsn: str, started_wall: float) -> list[tuple[float, int]]:
    """(seconds after the clock's start, records) of every repo done. A done mark's
    `updated_at` is its transaction's start: the repo's rows committed just before it."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM updated_at)::float8 AS at, records"
            " FROM backfill_repos WHERE state = 'done'"
        )
        return sorted((row["at"] - started_wall, int(row["records"])) for row in rows)
    finally:
        await conn.close()


def report_timeline(done: list[tuple[float, int]], elapsed_s: float) -> None:
    """Records committed per TIMELINE_BUCKET_S of the clock: the ramp at the start, the steady
    rate and the tail, where a mean over the whole run hides them."""
    buckets = [0] * (int(elapsed_s / TIMELINE_BUCKET_S) + 1)
    for at, records in done:
        buckets[min(max(int(at / TIMELINE_BUCKET_S), 0), len(buckets) - 1)] += records
    first = done[0][0] if done else 0.0
    print(f"timeline: first repo done at +{first:.2f} s; records/s per {TIMELINE_BUCKET_S} s:")
    print(" ".join(f"{n / TIMELINE_BUCKET_S / 1000:.0f}k" for n in buckets))


# The data pages the server wrote out of its shared buffers (evicted by a backend, a COPY's
# ring, the background writer, a checkpoint), extended its files by, and read back (PostgreSQL
# 16's pg_stat_io; initdb's standalone backend and this bench's own count(*), a bulk read, left
# out). Each page written or extended is 8 KB copied into the page cache, which on this machine is
# a quarter of PostgreSQL's CPU in a 1,000 x 500 run (docs/performance-log.md, session 27). A
# backend's counts reach the view when it exits or idles, so the last second's may be missing.
PAGES_IO = """
SELECT coalesce(sum(writes), 0)::bigint AS pages_written,
       coalesce(sum(extends), 0)::bigint AS pages_extended,
       coalesce(sum(reads), 0)::bigint AS pages_read
  FROM pg_stat_io
 WHERE backend_type <> 'standalone backend' AND context <> 'bulkread'
"""


# What the run left on disk: the tables' heap and their indexes (the `uri` keys' leaf pages,
# half empty when a fresh repo's rows go in key order: firehose/storage/fill_order.py), and
# `records_pkey` alone, in 8 KB pages.
SIZES = """
SELECT coalesce(sum(pg_table_size(c.oid)), 0)::bigint / 8192 AS table_pages,
       coalesce(sum(pg_indexes_size(c.oid)), 0)::bigint / 8192 AS index_pages,
       pg_relation_size('records_pkey') / 8192 AS records_pkey_pages
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind = 'r'
"""


# --known: a head older than every commit ($2, the smallest TID) and a chain head, as the
# live stream leaves a repo it has applied a commit of.
KNOWN_HEADS = """
INSERT INTO actors (did, rev, chain_rev) SELECT d, $2, $2 FROM unnest($1::text[]) AS d
"""


async def seed_heads(dsn: str, relay_url: str) -> int:
    """--known: a head in `actors` for every repo the relay lists; the number of repos."""
    import aiohttp

    from backfill.hosts import HostClient
    from backfill.relay_http import list_repos, relay_http_base
    from firehose.protocol.syntax import make_tid
    from firehose.storage.migrate import migrate

    dids: list[str] = []
    cursor: str | None = None
    async with aiohttp.ClientSession() as session:
        http = HostClient(session, per_host_concurrency=1, allow_private=True)
        while True:
            page = await list_repos(http, relay_http_base(relay_url), cursor)
            dids += [ref.did for ref in page.repos]
            if page.cursor is None:
                break
            cursor = page.cursor
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(KNOWN_HEADS, dids, make_tid(0))
    finally:
        await conn.close()
    return len(dids)


def import_service() -> None:
    """Load the modules `run_in_process` uses before the clock starts: a process that runs
    a backfill (the worker, `firehose backfill run`) has them loaded before it starts one.
    Loaded inside the clock, they took its first 0.14 s (a run's timeline, session 33)."""
    import prometheus_client  # noqa: F401
    import uvloop  # noqa: F401

    import backfill.service  # noqa: F401
    import firehose.storage.database  # noqa: F401


async def run_in_process(env: dict[str, str]) -> None:
    from prometheus_client import CollectorRegistry

    from backfill.service import BackfillService
    from firehose.gctune import tune_gc
    from firehose.settings import Settings
    from firehose.storage.database import Database

    settings = Settings.from_env({**os.environ, **env})
    tune_gc()  # as `firehose backfill run` does (backfill/cli.py)
    db = await Database.open(settings.database)
    try:
        service = BackfillService(
            settings.backfill,
            db.pool,
            CollectorRegistry(),
            relay_url=settings.relay.url,
            worker_id=0,
            live_pressure=None,
            dsn=db.dsn,  # helper processes with BACKFILL_PROCESSES > 1 (unthrottled: auto)
        )
        await service.run(asyncio.Event())
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repos", type=int, default=1000)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--profile-name", default="unthrottled", help="BACKFILL_PROFILE")
    parser.add_argument("--processes", help="BACKFILL_PROCESSES (default: the profile's)")
    parser.add_argument("--subprocess", action="store_true", help="firehose backfill run")
    parser.add_argument("--cprofile", metavar="FILE", help="cProfile the backfill into FILE")
    parser.add_argument("--statements", action="store_true", help="time each SQL statement")
    parser.add_argument(
        "--waits", action="store_true", help="sample what PostgreSQL's backends wait on"
    )
    parser.add_argument(
        "--history-model", type=int, default=0, metavar="N", help="N history-model repos"
    )
    parser.add_argument("--guarded", action="store_true", help="no COPY load of fresh repos")
    parser.add_argument(
        "--known", action="store_true", help="every repo has a head first: none is fresh"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="records committed per half second of the clock (from the repos' done marks)",
    )
    parser.add_argument(
        "--disk-spool",
        action="store_true",
        help="spool every repo to disk (no in-memory small repos: the earlier behaviour)",
    )
    args = parser.parse_args()
    load_at_start()  # before the bench loads the machine itself
    if args.disk_spool:
        import backfill.download

        backfill.download.MEMORY_SPOOL_MAX_BYTES = 0
    if args.guarded:
        import firehose.storage.snapshots

        firehose.storage.snapshots.fresh_candidate = lambda prep: None  # every batch guarded
    if args.subprocess and (args.cprofile or args.statements or args.disk_spool or args.guarded):
        parser.error(
            "--cprofile, --statements, --disk-spool and --guarded need the in-process backfill"
        )

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    statements = StatementTimes() if args.statements else None
    if statements is not None:
        statements.install()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.history_model:
            repo_args = ["--history-model", "year", "--model-accounts", str(args.history_model)]
            what = f"{args.history_model:,} history-model repos"
        else:
            repo_args = ["--repo-accounts", str(args.repos), "--repo-records", str(args.records)]
            what = f"{args.repos:,} repos x {args.records:,} records"
        devnet, urls = start_history_devnet(tmp, args.seed, repo_args, what)
        pg = start_embedded(tmp / "pg")
        try:
            if args.known:
                known = _run_loop(seed_heads(pg.dsn, urls["relay"]))
                print(f"known: {known:,} repos given a head first")
            env = backfill_env(pg.dsn, urls, -1, args.profile_name)
            if args.processes:
                env["BACKFILL_PROCESSES"] = args.processes
            processes = BackfillSettings.from_env(env).processes
            pg_procs: Callable[[], list[psutil.Process]] = lambda: postgres_processes(tmp / "pg")  # noqa: E731
            devnet_proc = psutil.Process(devnet.pid)
            pg_cpu = CpuTracker(pg_procs)
            devnet_cpu0 = cpu_s([devnet_proc])
            load = MachineLoad()
            waits = PgWaits(pg.dsn).start() if args.waits else None
            if not args.subprocess:
                import_service()
            started = time.monotonic()
            started_wall = time.time()
            if args.subprocess:
                log = tmp / "backfill.log"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "firehose", "backfill", "run"],
                    cwd=ROOT, env={**os.environ, **env}, stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                sampler = PeakRss(proc.pid)
                # Once it is waited for, its CPU and its helpers' (which it waited for) is in
                # this process's children times: exact, where sampling would lose the end.
                children0 = children_cpu_s()
                while proc.poll() is None:
                    time.sleep(0.2)
                bf_cpu = children_cpu_s() - children0
                if proc.returncode != 0:
                    raise SystemExit(
                        f"backfill exited {proc.returncode}: {log.read_text()[-3000:]}"
                    )
                cpu_backfill = bf_cpu
            else:
                sampler = PeakRss(os.getpid())
                me = psutil.Process()
                cpu_self0 = cpu_s([me]) + children_cpu_s()
                profiler = cProfile.Profile() if args.cprofile else None
                if profiler is not None:
                    profiler.enable()
                _run_loop(run_in_process(env))
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(args.cprofile)
                # With its helper processes, waited for when the job ended.
                cpu_backfill = cpu_s([me]) + children_cpu_s() - cpu_self0
            elapsed = time.monotonic() - started
            if waits is not None:
                waits.stop()
            peak = sampler.stop()
            cpu = {
                "backfill": cpu_backfill,
                "postgres": pg_cpu.stop(),
                "devnet": cpu_s([devnet_proc]) - devnet_cpu0,
            }
            load.stop(sum(cpu.values()))
            job = _run_loop(job_numbers(pg.dsn))
            timeline = _run_loop(done_timeline(pg.dsn, started_wall)) if args.timeline else None
        finally:
            pg.stop()
            devnet.terminate()
            devnet.wait(10)
    records = int(job["records_processed"])
    result = {
        "repos": args.history_model or args.repos,
        "records_per_repo": None if args.history_model else args.records,
        "history_model": bool(args.history_model),
        # guarded: the unguarded load turned off; known: every repo had a head first
        "write_path": "guarded" if args.guarded else "known" if args.known else "fresh",
        "profile": args.profile_name,
        "processes": processes,
        "mode": "subprocess" if args.subprocess else "in-process",
        "status": job["status"],
        "repos_done": int(job["repos_done"]),
        "repos_failed": int(job["repos_failed"]),
        "records": records,
        "records_in_table": int(job["records_in_table"]),
        "elapsed_s": round(elapsed, 2),
        "records_per_s": round(records / elapsed),
        "repos_per_s": round(int(job["repos_done"]) / elapsed, 1),
        "peak_rss_mb": round(peak / 2**20),
        "cpu_s_backfill": round(cpu["backfill"], 1),
        "cpu_s_postgres": round(cpu["postgres"], 1),
        "cpu_s_devnet": round(cpu["devnet"], 1),
        "cpu_us_per_record_backfill": round(cpu["backfill"] / max(records, 1) * 1e6, 1),
        "cpu_us_per_record_postgres": round(cpu["postgres"] / max(records, 1) * 1e6, 1),
        "wal_bytes_per_record": round(int(job["wal_bytes"]) / max(records, 1)),
        "wal_fpi": int(job["wal_fpi"]),
        "wal_writes": int(job["wal_write"]),
        "wal_syncs": int(job["wal_sync"]),
        "pg_pages_written": int(job["pages_written"]),
        "pg_pages_extended": int(job["pages_extended"]),
        "pg_pages_read": int(job["pages_read"]),
        "table_pages": int(job["table_pages"]),
        "index_pages": int(job["index_pages"]),
        "records_pkey_pages": int(job["records_pkey_pages"]),
        **load.fields(),
    }
    done = result["repos_done"]
    print(f"job {job['status']}: {done:,} repos, {records:,} records in {elapsed:.1f} s")
    print(load.describe())
    print(claim(load, f"records/s committed: {result['records_per_s']:,}"))
    print(claim(load, f"repos/s: {result['repos_per_s']}"))
    print(f"backfill processes (BACKFILL_PROCESSES): {processes}")
    print(f"peak RSS (backfill processes together): {result['peak_rss_mb']} MB")
    print(
        f"CPU s: backfill {cpu['backfill']:.1f}, postgres {cpu['postgres']:.1f}, "
        f"devnet {cpu['devnet']:.1f} (wall {elapsed:.1f} s, {os.cpu_count()} cores)"
    )
    print(
        f"CPU µs per record: backfill {result['cpu_us_per_record_backfill']}, "
        f"postgres {result['cpu_us_per_record_postgres']} ({result['write_path']})"
    )
    print(
        f"WAL: {int(job['wal_bytes']) / 2**20:,.0f} MB, {result['wal_bytes_per_record']:,} bytes "
        f"per record, {result['wal_fpi']:,} full-page images, "
        f"{result['wal_writes']:,} writes, {result['wal_syncs']:,} syncs"
    )
    print(
        f"data pages (8 KB): {result['pg_pages_written']:,} written out of shared buffers, "
        f"{result['pg_pages_extended']:,} extended, {result['pg_pages_read']:,} read back"
    )
    print(
        f"on disk (8 KB pages): tables {result['table_pages']:,}, their indexes "
        f"{result['index_pages']:,}, of which records_pkey {result['records_pkey_pages']:,}"
    )
    if statements is not None:
        report_statements(statements, elapsed)
    if waits is not None:
        waits.report()
    if timeline is not None:
        report_timeline(timeline, elapsed)
    if args.cprofile:
        pstats.Stats(args.cprofile).sort_stats("tottime").print_stats(25)
    print(json.dumps({"bench": "backfill", **result}))


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


if __name__ == "__main__":
    main()
