"""`firehose backfill status|pause|resume|retry-failed|add|run|helper`.

Control acts through the job row, so a running worker (this machine or another) notices
within seconds; nothing talks to the worker process directly. Exit status: 0 done, 1 the
command could not act (no job, nothing to pause, ...), 2 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from backfill import jobs, queue
from backfill.status import job_status, render
from firehose import eventloop
from firehose.protocol.syntax import is_did
from firehose.settings import Settings

EXIT_OK = 0
EXIT_NO_ACTION = 1
EXIT_CONFIG = 2


def add_subcommands(subparsers: Any) -> None:
    """Add `backfill` and its subcommands to the top-level `firehose` parser."""
    bf = subparsers.add_parser("backfill", help="inspect and control the history backfill")
    sub = bf.add_subparsers(dest="backfill_command", required=True)
    status = sub.add_parser("status", help="job, repos by state, records, rate, ETA")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    sub.add_parser("pause", help="pause the active job (running workers hold within seconds)")
    sub.add_parser("resume", help="resume a paused job")
    sub.add_parser("retry-failed", help="queue the failed repos of the job again")
    add = sub.add_parser("add", help="queue repos first (before enumerated ones)")
    add.add_argument("dids", nargs="+", metavar="DID")
    run = sub.add_parser("run", help="run the backfill alone (no live stream) until done")
    run.add_argument(
        "--dry-run", action="store_true", help="fetch and count, write nothing (BACKFILL_DRY_RUN)"
    )
    sub.add_parser(
        "helper",
        help="(internal) a helper process, started by a backfill with BACKFILL_PROCESSES > 1",
    )


def handle(args: argparse.Namespace, settings: Settings) -> int:
    handlers: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
        "status": _status,
        "pause": _pause,
        "resume": _resume,
        "retry-failed": _retry_failed,
        "add": _add,
        "run": _run,
        "helper": _helper,
    }
    return eventloop.run(handlers[args.backfill_command](args, settings))


@contextlib.asynccontextmanager
async def _connection(settings: Settings) -> Any:
    from firehose.storage.database import Database

    db = await Database.open(settings.database)
    try:
        async with db.pool.acquire() as conn:
            yield conn
    finally:
        await db.close()


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with _connection(settings) as conn:
        job = await jobs.current_job(conn)
        if job is None:
            print("No backfill job yet: start one with BACKFILL_DAYS=N (or -1).")
            return EXIT_NO_ACTION
        status = await job_status(conn, job)
        status["failed_sample"] = await queue.failed_sample(conn, job.id)
    if args.json:
        print(json.dumps(status, default=str, indent=2))
    else:
        print(render(status))
    return EXIT_OK


# verb -> (new status, statuses it may come from). Shared with the worker's HTTP admin
# endpoints (firehose.ops), so both act on the job row in exactly the same way.
TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pause": ("paused", ("running", "paused_rate_limited")),
    "resume": ("running", ("paused",)),
}


async def control(conn: Any, verb: str) -> tuple[jobs.Job | None, bool]:
    """Pause or resume the current job through its row; (job as it was, whether it moved)."""
    to, from_ = TRANSITIONS[verb]
    job = await jobs.current_job(conn)
    moved = job is not None and await jobs.set_status(conn, job.id, to, from_)
    return job, moved


async def _set(settings: Settings, verb: str) -> int:
    async with _connection(settings) as conn:
        job, moved = await control(conn, verb)
    if job is None or not moved:
        state = "no job" if job is None else f"job {job.id} is {job.status}"
        print(f"Nothing to {verb}: {state}.")
        return EXIT_NO_ACTION
    print(f"Job {job.id} {verb}d (was {job.status}).")
    return EXIT_OK


async def _pause(args: argparse.Namespace, settings: Settings) -> int:
    return await _set(settings, "pause")


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    return await _set(settings, "resume")


async def _retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    async with _connection(settings) as conn:
        job = await jobs.current_job(conn)
        if job is None:
            print("No backfill job.")
            return EXIT_NO_ACTION
        n = await queue.retry_failed(conn, job.id)
    print(f"Job {job.id}: {n} failed repo(s) queued again.")
    return EXIT_OK


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    bad = [d for d in args.dids if not is_did(d)]
    if bad:
        print(f"firehose: not a DID: {', '.join(bad)}", file=sys.stderr)
        return EXIT_CONFIG
    async with _connection(settings) as conn:
        if settings.backfill.enabled:
            decision = await jobs.ensure_job(
                conn, settings.backfill.days, settings.relay.url, datetime.now(UTC)
            )
            job = decision.job if decision.action != "already_completed" else None
        else:
            job = await jobs.current_job(conn)
            job = job if job is not None and job.active else None
        if job is None:
            print("No active backfill job: set BACKFILL_DAYS=N (or -1) to start one.")
            return EXIT_NO_ACTION
        inserted = await queue.enqueue(conn, job.id, args.dids, queue.PRIORITY_REQUESTED)
    print(
        f"Job {job.id}: {len(args.dids)} repo(s) queued first "
        f"({inserted} new, {len(args.dids) - inserted} already known)."
    )
    return EXIT_OK


def _stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set: the backfill then stops, handing its repos back."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from prometheus_client import CollectorRegistry

    from backfill.service import BackfillService
    from firehose.gctune import tune_gc
    from firehose.storage.database import Database

    bf = settings.backfill
    if args.dry_run:
        bf = dataclasses.replace(bf, dry_run=True)
    if not bf.enabled:
        print("firehose: BACKFILL_DAYS is 0 (off): set BACKFILL_DAYS=N or -1", file=sys.stderr)
        return EXIT_CONFIG
    stop = _stop_on_signals()
    tune_gc()  # this process is the backfill's own, as the worker's is (firehose/gctune.py)
    db = await Database.open(settings.database)
    try:
        service = BackfillService(
            bf,
            db.pool,
            CollectorRegistry(),
            relay_url=settings.relay.url,
            worker_id=settings.worker.worker_id,
            live_pressure=None,
            wanted_collections=settings.pipeline.wanted_collections,
            dsn=db.dsn,
        )
        await service.run(stop)
    finally:
        await db.close()
    return EXIT_OK


async def _helper(args: argparse.Namespace, settings: Settings) -> int:
    """A helper of a backfill (backfill/helpers.py): the settings come from the parent."""
    from prometheus_client import CollectorRegistry

    from backfill.helpers import ParentLink, helper_env_fd
    from backfill.service import BackfillService
    from firehose.gctune import tune_gc
    from firehose.settings import DatabaseSettings
    from firehose.storage.database import Database

    link = ParentLink(sys.stdin.buffer, helper_env_fd())
    start = link.read_start()
    stop = _stop_on_signals()
    tune_gc()
    database = DatabaseSettings(start.dsn, settings.database.data_dir, start.pool_size)
    db = await Database.open(database)
    follow = asyncio.create_task(link.follow(stop))
    done = asyncio.Event()
    try:
        service = BackfillService(
            start.backfill,
            db.pool,
            CollectorRegistry(),
            relay_url=start.relay_url,
            worker_id=start.worker_id,
            live_pressure=link.pressure if start.live else None,
            wanted_collections=start.wanted_collections,
            join_job=start.job_id,
        )
        report = asyncio.create_task(link.report(service.progress.total, done))
        try:
            await service.run(stop)
        finally:
            done.set()
            await report
    finally:
        follow.cancel()
        await db.close()
    return EXIT_OK
