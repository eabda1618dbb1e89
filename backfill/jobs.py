"""Backfill jobs: a fixed time window, a status, counters and a final summary.

Start rule (the guide's "Resume After Interruption"): restarting with the same BACKFILL_DAYS
resumes the active job, keeping its window (the cutoff was fixed when it was created);
another value ends the active job (status failed, error "superseded ...") and starts a new
one. A completed job with the same BACKFILL_DAYS is not redone: its window is covered, and
the live stream has indexed everything since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from backfill import queries


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    days: int
    cutoff: datetime | None  # None: the whole history
    started_at: datetime
    status: str
    relay_url: str
    list_cursor: str | None
    list_pages: int
    enumeration_done: bool
    repos_total: int
    repos_done: int
    repos_failed: int
    records_received: int
    records_processed: int
    records_skipped: int
    bytes_downloaded: int
    # Narrowing (sql/006): repos enumeration did not queue because their latest rev is older
    # than the cutoff, and how repos are enumerated (backfill/enum_plan.py).
    repos_skipped_dormant: int
    list_method: str | None
    list_collection: str | None
    list_collections_done: tuple[str, ...]
    list_fallback: str | None
    error: str | None
    summary: dict[str, Any] | None
    updated_at: datetime
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        summary = row["summary"]
        if isinstance(summary, str):  # asyncpg returns jsonb as text without a codec
            summary = json.loads(summary)
        values = {f.name: row[f.name] for f in fields(cls)}
        values["summary"] = summary
        values["list_collections_done"] = tuple(values["list_collections_done"] or ())
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.status in queries.ACTIVE_STATUSES

    def describe_window(self) -> str:
        if self.cutoff is None:
            return "whole history"
        return f"records since {self.cutoff.isoformat(timespec='seconds')}"


@dataclass(frozen=True, slots=True)
class JobDecision:
    job: Job
    action: str  # "created", "resumed" or "already_completed"
    superseded: Job | None = None


def cutoff_for(days: int, now: datetime) -> datetime | None:
    return None if days == -1 else now - timedelta(days=days)


async def ensure_job(conn: Any, days: int, relay_url: str, now: datetime) -> JobDecision:
    """Find the job for `days` or create it (see the module docstring), atomically against
    other processes starting at the same time."""
    async with conn.transaction():
        await conn.execute(queries.JOB_LOCK, queries.JOB_LOCK_KEY)
        active = await conn.fetchrow(queries.JOB_ACTIVE)
        if active is not None and active["days"] == days:
            return JobDecision(Job.from_row(active), "resumed")
        superseded = None
        if active is not None:
            superseded = Job.from_row(active)
            reason = f"superseded: BACKFILL_DAYS changed from {superseded.days} to {days}"
            await conn.execute(queries.JOB_SUPERSEDE, superseded.id, reason)
        else:
            latest = await conn.fetchrow(queries.JOB_LATEST_FOR_DAYS, days)
            if latest is not None and latest["status"] == "completed":
                return JobDecision(Job.from_row(latest), "already_completed")
        row = await conn.fetchrow(queries.JOB_CREATE, days, cutoff_for(days, now), now, relay_url)
        return JobDecision(Job.from_row(row), "created", superseded)


async def load_job(conn: Any, job_id: int) -> Job | None:
    row = await conn.fetchrow(queries.JOB_GET, job_id)
    return Job.from_row(row) if row is not None else None


async def current_job(conn: Any) -> Job | None:
    """The active job, else the latest one (for status and control commands)."""
    row = await conn.fetchrow(queries.JOB_ACTIVE)
    if row is None:
        row = await conn.fetchrow(queries.JOB_LATEST)
    return Job.from_row(row) if row is not None else None


async def set_status(conn: Any, job_id: int, status: str, from_statuses: tuple[str, ...]) -> bool:
    """Move the job to `status` if it is in one of `from_statuses`; True if it moved."""
    moved = await conn.fetchval(queries.JOB_SET_STATUS, job_id, status, list(from_statuses))
    return moved is not None


async def add_records(
    conn: Any, job_id: int, *, received: int, processed: int, skipped: int, bytes_: int
) -> None:
    if received or processed or skipped or bytes_:
        await conn.execute(queries.JOB_ADD_RECORDS, job_id, received, processed, skipped, bytes_)


async def try_complete(conn: Any, job_id: int) -> Job | None:
    """Complete the job if all its work is finished; the completed job, else None."""
    row = await conn.fetchrow(queries.JOB_COMPLETE, job_id)
    return Job.from_row(row) if row is not None else None


async def fail_job(conn: Any, job_id: int, error: str) -> None:
    await conn.execute(queries.JOB_FAIL, job_id, error)


async def vacuum_analyze(conn: Any) -> list[str]:
    """VACUUM ANALYZE the tables a backfill writes (outside any transaction)."""
    for table in queries.VACUUM_TABLES:
        await conn.execute(f"VACUUM ANALYZE {table}")  # constants, never input
    return list(queries.VACUUM_TABLES)
