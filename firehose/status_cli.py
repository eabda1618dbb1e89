"""`firehose status [--url URL] [--json]`: the facts of `/status` in a terminal.

Without `--url` they are read from the database (the cursor rows and the backfill job), so
it works with no worker running; the in-memory facts (events committed since start, relay
link, queue depth) are then null. With `--url` (e.g. http://localhost:8000) they come from a
running worker's `/status`. Never prints the database URL: it holds the password.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

from firehose.settings import Settings

EXIT_OK = 0
EXIT_UNREACHABLE = 1
HTTP_TIMEOUT_S = 5.0
BAR_WIDTH_CHARS = 30

CURSOR_ROWS = """
SELECT service, cursor, last_event_time, updated_at FROM firehose_cursor ORDER BY service
"""


def add_subcommand(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status", help="worker position, lag and backfill progress (database or --url)"
    )
    status.add_argument(
        "--url", help="a running worker's METRICS_PORT base URL, e.g. http://localhost:8000"
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")


def handle(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.url:
            status = asyncio.run(from_url(args.url))
        else:
            status = asyncio.run(from_database(settings))
    except (OSError, TimeoutError) as exc:
        # Class and text of a network error only; the database URL is never echoed.
        print(f"firehose: status unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(status, default=str, indent=2) if args.json else render(status))
    return EXIT_OK


async def from_url(url: str) -> dict[str, Any]:
    import aiohttp

    base = url.rstrip("/")
    if not base.endswith("/status"):
        base += "/status"
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(base) as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
    body["source"] = base
    return body


async def from_database(settings: Settings) -> dict[str, Any]:
    from backfill import jobs
    from backfill.resync import counts as resync_counts
    from backfill.status import job_status
    from firehose.storage.database import Database

    w = settings.worker
    db = await Database.open(settings.database)
    try:
        async with db.pool.acquire() as conn:
            rows = await conn.fetch(CURSOR_ROWS)
            job = await jobs.current_job(conn)
            backfill: dict[str, Any] = {"enabled": False}
            if job is not None:
                backfill = {"enabled": job.active, **await job_status(conn, job)}
            resyncs = await resync_counts(conn)
    finally:
        await db.close()
    cursors = {r["service"]: dict(r) for r in rows}
    mine = cursors.get(w.cursor_service, {})
    last = mine.get("last_event_time")
    return {
        "source": "database",
        "worker_id": w.worker_id,
        "worker_count": w.worker_count,
        "cursor_service": w.cursor_service,
        "cursor": mine.get("cursor"),
        "last_event_time": last.isoformat() if last else None,
        "lag_seconds": round((datetime.now(UTC) - last).total_seconds(), 3) if last else None,
        # Known only inside a running worker (use --url):
        "events_committed": None,
        "relay_connected": None,
        "queue_depth": None,
        "cursors": {
            name: {
                "cursor": r["cursor"],
                "last_event_time": r["last_event_time"],
                "updated_at": r["updated_at"],
            }
            for name, r in cursors.items()
        },
        "backfill": backfill,
        "resyncs": resyncs,
    }


def progress_bar(ratio: float, width: int = BAR_WIDTH_CHARS) -> str:
    """`[#######-------]  45.0%`: ratio clamped to 0..1."""
    ratio = min(max(ratio, 0.0), 1.0)
    filled = round(ratio * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {ratio * 100:5.1f}%"


def _show(value: Any) -> str:
    return "n/a" if value is None else str(value)


def render(status: dict[str, Any]) -> str:
    """The human form of `firehose status`."""
    lines = [
        f"Worker {status['worker_id']} of {status['worker_count']} "
        f"(cursor service {status['cursor_service']!r}, from {status.get('source', '?')})",
        f"  Cursor:     {_show(status['cursor'])} (last event {_show(status['last_event_time'])})",
        f"  Lag:        {_show(status['lag_seconds'])} s",
        f"  Committed:  {_show(status['events_committed'])} events since start",
        f"  Relay:      {_connected(status['relay_connected'])}, "
        f"queue depth {_show(status['queue_depth'])}",
    ]
    for name, row in (status.get("cursors") or {}).items():
        if name != status["cursor_service"]:
            lines.append(f"  Also:       {name} at {row['cursor']}")
    lines.append(_render_backfill(status.get("backfill") or {"enabled": False}))
    rs = status.get("resyncs")
    if rs:  # repo_resyncs: queue totals (database), or this worker's share (--url)
        lines.append(
            f"  Resyncs:    {rs['pending']} pending, {rs['in_progress']} in progress, "
            f"{rs['done']} done, {rs['failed']} failed"
        )
    return "\n".join(lines)


def _connected(value: bool | None) -> str:
    return "n/a" if value is None else ("connected" if value else "disconnected")


def _render_backfill(bf: dict[str, Any]) -> str:
    if "repos" not in bf:
        state = bf.get("state")
        return f"  Backfill:   {state or ('enabled' if bf.get('enabled') else 'off')}"
    from backfill.status import format_eta

    r = bf["repos"]
    return (
        f"  Backfill:   job {bf.get('job_id')} {bf.get('status') or bf.get('state')} "
        f"{progress_bar(float(bf.get('progress_ratio') or 0.0))} "
        f"{r['done'] + r['failed']}/{r['total']} repos, ETA {format_eta(bf.get('eta_s'))}"
    )
