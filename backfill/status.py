"""The job's state as numbers: repos by state, records, rates, progress and ETA.

Computed from the job row's counters (kept in the same statements as the queue's state
changes) plus one indexed count of in-flight repos, so it stays cheap with millions of
repos and can run every second.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from backfill import queries
from backfill.jobs import Job


def estimate(job: Job, in_progress: int, now: datetime) -> dict[str, Any]:
    """PURE: the status numbers of `job` at `now`."""
    finished = job.repos_done + job.repos_failed
    pending = max(job.repos_total - finished - in_progress, 0)
    end = job.completed_at or now
    elapsed_s = max((end - job.started_at).total_seconds(), 1e-9)
    repo_rate = finished / elapsed_s
    eta_s: float | None = None
    if job.status == "completed":
        eta_s = 0.0
    elif job.enumeration_done and repo_rate > 0:
        eta_s = round((pending + in_progress) / repo_rate, 1)
    ratio = finished / job.repos_total if job.repos_total else 0.0
    return {
        "job_id": job.id,
        "status": job.status,
        "days": job.days,
        "cutoff": job.cutoff.isoformat() if job.cutoff else None,
        "started_at": job.started_at.isoformat(),
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
        "enumeration_done": job.enumeration_done,
        "list_pages": job.list_pages,
        "repos": {
            "pending": pending,
            "in_progress": in_progress,
            "done": job.repos_done,
            "failed": job.repos_failed,
            "total": job.repos_total,
            # Not queued: the latest commit is older than the cutoff (BACKFILL_SKIP_DORMANT).
            "skipped_dormant": job.repos_skipped_dormant,
        },
        "enumeration": {
            "method": job.list_method,  # None until the first page
            "collection": job.list_collection,  # the current listReposByCollection pass
            "collections_done": list(job.list_collections_done),
            "fallback": job.list_fallback,  # why listReposByCollection was given up
        },
        "records": {
            "received": job.records_received,
            "processed": job.records_processed,
            "skipped": job.records_skipped,
        },
        "bytes_downloaded": job.bytes_downloaded,
        "elapsed_s": round(elapsed_s, 1),
        "repos_per_s": round(repo_rate, 3),
        "records_per_s": round(job.records_processed / elapsed_s, 1),
        "progress_ratio": round(ratio, 4),
        "eta_s": eta_s,
        "error": job.error,
        "summary": job.summary,
    }


async def job_status(conn: Any, job: Job, now: datetime | None = None) -> dict[str, Any]:
    in_progress = int(await conn.fetchval(queries.REPOS_IN_PROGRESS, job.id) or 0)
    return estimate(job, in_progress, now or datetime.now(UTC))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(seconds)
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render(status: dict[str, Any]) -> str:
    """The human form of `firehose backfill status`."""
    r = status["repos"]
    rec = status["records"]
    enum = status.get("enumeration") or {}
    window = f"since {status['cutoff']}" if status["cutoff"] else "whole history"
    lines = [
        f"Job {status['job_id']}: {status['status']} (BACKFILL_DAYS={status['days']}, {window})",
        f"  Started:   {status['started_at']}"
        + (f", completed {status['completed_at']}" if status["completed_at"] else ""),
        f"  Repos:     {r['done']} done, {r['failed']} failed, {r['in_progress']} in progress, "
        f"{r['pending']} pending, {r['total']} enumerated"
        + (
            ""
            if status["enumeration_done"]
            else f" so far ({enum.get('method') or 'listRepos'} page {status['list_pages']})"
        ),
        f"  Skipped:   {r.get('skipped_dormant', 0)} dormant (latest commit before the cutoff)",
        f"  Listing:   {_listing(enum)}",
        f"  Records:   {rec['received']} received, {rec['processed']} processed, "
        f"{rec['skipped']} skipped; {status['bytes_downloaded']} bytes downloaded",
        f"  Rate:      {status['repos_per_s']} repos/s, {status['records_per_s']} records/s",
        f"  Progress:  {status['progress_ratio'] * 100:.1f}%, ETA {format_eta(status['eta_s'])}",
    ]
    if status.get("error"):
        lines.append(f"  Error:     {status['error']}")
    for f in status.get("failed_sample", []):
        lines.append(f"  Failed:    {f['did']} after {f['attempts']} attempt(s): {f['error']}")
    return "\n".join(lines)


def _listing(enum: dict[str, Any]) -> str:
    """How repos are enumerated, in one line of `firehose backfill status`."""
    method = enum.get("method")
    if method is None:
        return "not started"
    if method == "listReposByCollection":
        done = enum.get("collections_done") or []
        current = enum.get("collection")
        return f"listReposByCollection, {len(done)} collection(s) done" + (
            f", now {current}" if current else ""
        )
    fallback = enum.get("fallback")
    return "listRepos" + (f" (fell back: {fallback})" if fallback else "")
