"""The work queue: one `backfill_repos` row per (job, repo), shared by every process.

* `claim` takes due pending repos with FOR UPDATE SKIP LOCKED and leases them to an owner:
  two processes never get the same repo, and neither waits for the other's locks.
* Every state change is guarded by the lease owner, so a process whose lease was reclaimed
  cannot overwrite the work of the one that took over.
* `reclaim` is the stuck-work recovery: expired leases (a crashed or stalled process) come
  back as pending, at start-up and periodically.
* A repo in state `done` is never claimed again; `enqueue` leaves it alone.

Retry policy: transient failures retry after 1 s, 2 s, 4 s ... (`backoff_s`) until
BACKFILL_MAX_ATTEMPTS attempts, then the repo is failed with its error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from backfill import queries
from backfill.progress import Counts

RETRY_BASE_S = 1.0  # first retry after 1 s, doubling
RETRY_MAX_S = 3600.0  # never wait more than an hour between attempts
PRIORITY_ENUMERATED = 0
PRIORITY_REQUESTED = 100  # BACKFILL_DIDS and `firehose backfill add`


@dataclass(frozen=True, slots=True)
class Claimed:
    did: str
    attempts: int  # failed attempts before this one
    priority: int
    headed: bool = False  # it had a head in `actors` when claimed (queries.REPOS_CLAIM)


def host_prefix(host: str | None = None) -> str:
    return f"{host or socket.gethostname()}:"


def owner_id(worker_id: int, pid: int | None = None, host: str | None = None) -> str:
    """Lease owners are `<host>:w<worker_id>:<pid>`: unique per live process, and telling
    a restarted process which leases on its host belong to dead processes."""
    return f"{host_prefix(host)}w{worker_id}:{os.getpid() if pid is None else pid}"


def owner_pid(owner: str) -> int | None:
    try:
        return int(owner.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


async def dead_owners_on_host(conn: Any, job_id: int, host: str | None = None) -> list[str]:
    """Lease owners on this host whose process is gone (or is us: a container restarts with
    the same pid), so their work can be taken back at once instead of after the lease."""
    import psutil

    me = os.getpid()
    rows = await conn.fetch(queries.LEASE_OWNERS_ON_HOST, job_id, host_prefix(host))
    dead = []
    for row in rows:
        owner = row[0]
        pid = owner_pid(owner) if owner else None
        if pid is not None and (pid == me or not psutil.pid_exists(pid)):
            dead.append(owner)
    return dead


def backoff_s(attempts: int) -> float:
    """Delay before the next try after `attempts` failed attempts: 1, 2, 4, 8 ... s."""
    return min(RETRY_BASE_S * 2 ** max(attempts - 1, 0), RETRY_MAX_S)


async def enqueue(conn: Any, job_id: int, dids: Sequence[str], priority: int) -> int:
    """Add repos to the job (new ones count into repos_total); the number inserted."""
    if not dids:
        return 0
    # The lowest priority never raises a known repo's: insert-only (see REPOS_ENQUEUE_NEW).
    query = queries.REPOS_ENQUEUE_NEW if priority <= PRIORITY_ENUMERATED else queries.REPOS_ENQUEUE
    async with conn.transaction():
        row = await conn.fetchrow(query, job_id, list(dids), priority)
        inserted = int(row["inserted"])
        if inserted:
            await conn.execute(queries.JOB_ADD_TOTAL, job_id, inserted)
    return inserted


async def claim(conn: Any, job_id: int, owner: str, limit: int, lease_s: float) -> list[Claimed]:
    rows = await conn.fetch(queries.REPOS_CLAIM, job_id, owner, limit, lease_s)
    return [Claimed(r["did"], r["attempts"], r["priority"], r["headed"]) for r in rows]


async def renew(conn: Any, job_id: int, dids: Sequence[str], owner: str, lease_s: float) -> None:
    if dids:
        await conn.execute(queries.REPOS_RENEW, job_id, list(dids), owner, lease_s)


async def save_repo_progress(
    conn: Any,
    job_id: int,
    did: str,
    owner: str,
    *,
    records: int,
    bytes_: int,
    rev: str | None,
    lease_s: float,
) -> None:
    await conn.execute(queries.REPO_PROGRESS, job_id, did, owner, records, bytes_, rev, lease_s)


@dataclass(frozen=True, slots=True)
class DoneMark:
    """A repo finished: what its queue row keeps."""

    did: str
    rev: str | None
    records: int
    bytes: int


def done_rows(marks: Sequence[DoneMark]) -> bytes:
    """queries.REPO_DONE's repos parameter: a JSON array of DONE_COLUMNS rows."""
    return orjson.dumps([(m.did, m.rev, m.records, m.bytes) for m in marks])


async def mark_done_many(
    conn: Any, job_id: int, owner: str, marks: Sequence[DoneMark], progress: Counts | None = None
) -> set[str]:
    """The repos of `marks` done, `progress` (this process's unsaved counters) added to the job
    and the 'backfill' cursor row touched, in one statement; the dids marked done (a repo
    whose lease was lost is not).

    Outside a transaction the statement commits asynchronously, as the repos' rows did
    (firehose/storage/fresh.py): the WAL is one sequential log, so a server crash that loses
    this commit also loses nothing older than it, and one that keeps it kept the rows. A lost
    mark only means the repo is claimed and written again, which the rev guards make
    idempotent; the counters are lost with it and counted again."""
    p = progress or Counts()
    row = await conn.fetchrow(
        queries.REPO_DONE, job_id, done_rows(marks), owner,
        p.received, p.processed, p.skipped, p.bytes, not conn.is_in_transaction(),
    )  # fmt: skip
    return set(row["done"])


async def mark_failed(conn: Any, job_id: int, did: str, owner: str, error: str) -> bool:
    changed = await conn.fetchval(queries.REPO_FAIL, job_id, did, owner, error[:1000])
    return bool(changed)


async def mark_retry(
    conn: Any, job_id: int, did: str, owner: str, error: str, delay_s: float, *, counts: bool
) -> bool:
    """Back to pending after `delay_s`; `counts`: the attempt counts toward the maximum."""
    attempts = await conn.fetchval(
        queries.REPO_RETRY, job_id, did, owner, error[:1000], 1 if counts else 0, delay_s
    )
    return attempts is not None


async def reclaim(
    conn: Any, job_id: int, max_attempts: int, dead_owners: Sequence[str] = ()
) -> int:
    """Stuck-work recovery: expired leases and those of `dead_owners` go back to pending
    (or failed after the last attempt); the number of repos taken back."""
    reclaimed = await conn.fetchval(queries.REPOS_RECLAIM, job_id, list(dead_owners), max_attempts)
    return int(reclaimed or 0)


async def retry_failed(conn: Any, job_id: int) -> int:
    return int(await conn.fetchval(queries.REPOS_RETRY_FAILED, job_id) or 0)


async def counts_by_state(conn: Any, job_id: int) -> dict[str, int]:
    counts = {"pending": 0, "in_progress": 0, "done": 0, "failed": 0}
    for row in await conn.fetch(queries.REPOS_BY_STATE, job_id):
        counts[row["state"]] = int(row["n"])
    return counts


async def failed_sample(conn: Any, job_id: int, limit: int = 10) -> list[dict[str, Any]]:
    rows = await conn.fetch(queries.REPOS_FAILED_SAMPLE, job_id, limit)
    return [dict(r) for r in rows]
