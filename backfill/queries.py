"""Named SQL of the backfill (tables from sql/003_backfill.sql). Every value is a bind parameter.

Durations are bound as float seconds and turned into intervals with make_interval(secs => ...).
Leases compare against the database clock (now()), never a client clock, so machines with
skewed clocks still agree on when a lease expired.
"""

from __future__ import annotations

from firehose.storage.queries import async_commit_if, rows_select

ACTIVE_STATUSES = ("running", "paused", "paused_rate_limited")
TERMINAL_STATUSES = ("completed", "failed")

# -- jobs ----------------------------------------------------------------------------------

JOB_ACTIVE = """
SELECT * FROM backfill_jobs
 WHERE status IN ('running', 'paused', 'paused_rate_limited')
 ORDER BY id DESC LIMIT 1
"""
JOB_LATEST = "SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1"
JOB_LATEST_FOR_DAYS = "SELECT * FROM backfill_jobs WHERE days = $1 ORDER BY id DESC LIMIT 1"
JOB_GET = "SELECT * FROM backfill_jobs WHERE id = $1"
JOB_CREATE = """
INSERT INTO backfill_jobs (days, cutoff, started_at, relay_url)
VALUES ($1, $2, $3, $4)
RETURNING *
"""
# A job replaced by one with another BACKFILL_DAYS: ends as failed, saying why.
JOB_SUPERSEDE = """
UPDATE backfill_jobs
   SET status = 'failed', error = $2, completed_at = now(), updated_at = now(),
       enum_owner = NULL, enum_lease_until = NULL
 WHERE id = $1
"""
# Serialises the find-or-create decision of concurrent start-ups (with the unique index on
# the active job as the backstop). Key: b"fh-bkfjb" as a big-endian int64.
JOB_LOCK = "SELECT pg_advisory_xact_lock($1)"
JOB_LOCK_KEY = int.from_bytes(b"fh-bkfjb", "big")

# Control (CLI) and rate-limit state: only from the listed statuses, so a user's pause is
# never overwritten by the service's own paused_rate_limited/running flips.
JOB_SET_STATUS = """
UPDATE backfill_jobs SET status = $2, updated_at = now()
 WHERE id = $1 AND status = ANY($3::text[])
RETURNING status
"""
JOB_STATUS = "SELECT status FROM backfill_jobs WHERE id = $1"
JOB_ADD_RECORDS = """
UPDATE backfill_jobs
   SET records_received = records_received + $2,
       records_processed = records_processed + $3,
       records_skipped = records_skipped + $4,
       bytes_downloaded = bytes_downloaded + $5,
       updated_at = now()
 WHERE id = $1
"""
# Completes the job when enumeration is finished and no repo is pending or in flight. One
# statement, guarded by the status: of several processes only one completes it. Each test
# reads its partial index (the ORDER BY is the index's): a plain EXISTS over the states was
# planned as a scan of the table expecting an early match, while near the end of a job, when
# this runs, the few repos left (retries waiting out their delay) come last: 0.36 s per call
# at 2 million rows, called every DISPATCH_POLL_S while the last repos wait.
JOB_COMPLETE = """
UPDATE backfill_jobs j
   SET status = 'completed', completed_at = now(), updated_at = now(),
       summary = jsonb_build_object(
           'job_id', j.id, 'days', j.days, 'cutoff', j.cutoff, 'started_at', j.started_at,
           'completed_at', now(),
           'duration_s', round(extract(epoch FROM now() - j.started_at)::numeric, 1),
           'repos_total', j.repos_total, 'repos_done', j.repos_done,
           'repos_failed', j.repos_failed, 'records_received', j.records_received,
           'records_processed', j.records_processed, 'records_skipped', j.records_skipped,
           'bytes_downloaded', j.bytes_downloaded, 'list_pages', j.list_pages,
           'repos_skipped_dormant', j.repos_skipped_dormant, 'list_method', j.list_method,
           'list_fallback', j.list_fallback)
 WHERE j.id = $1
   AND j.status IN ('running', 'paused_rate_limited')
   AND j.enumeration_done
   AND NOT EXISTS (SELECT 1 FROM backfill_repos r WHERE r.job_id = $1 AND r.state = 'pending'
                    ORDER BY r.priority DESC, r.next_attempt_at LIMIT 1)
   AND NOT EXISTS (SELECT 1 FROM backfill_repos r
                    WHERE r.job_id = $1 AND r.state = 'in_progress' ORDER BY r.lease_until LIMIT 1)
RETURNING *
"""
JOB_FAIL = """
UPDATE backfill_jobs SET status = 'failed', error = $2, completed_at = now(), updated_at = now()
 WHERE id = $1 AND status IN ('running', 'paused', 'paused_rate_limited')
"""

# -- enumeration (listRepos) ---------------------------------------------------------------

ENUM_CLAIM = """
UPDATE backfill_jobs
   SET enum_owner = $2, enum_lease_until = now() + make_interval(secs => $3::float8)
 WHERE id = $1 AND NOT enumeration_done
   AND (enum_owner IS NULL OR enum_owner = $2 OR enum_lease_until < now()
        OR enum_owner = ANY($4::text[]))
RETURNING list_cursor, list_pages, list_method, list_collection, list_collections_done
"""
ENUM_DONE = "SELECT enumeration_done FROM backfill_jobs WHERE id = $1"
# Enumeration state changes (backfill/enum_plan.py) are guarded by the lease owner and the
# state the page was fetched from ($3 method, $4 collection, $5 cursor): a process whose
# lease was taken over cannot move the state (its inserts were idempotent anyway).
_ENUM_GUARD = """
 WHERE id = $1 AND enum_owner = $2 AND NOT enumeration_done
   AND list_method IS NOT DISTINCT FROM $3 AND list_collection IS NOT DISTINCT FROM $4
   AND list_cursor IS NOT DISTINCT FROM $5
"""
# One page saved: the new state ($6..$9), done ($10), the page's dormant repos ($11, counted
# here, in the page's transaction, so a restart neither loses nor doubles them).
ENUM_ADVANCE = (
    """
UPDATE backfill_jobs
   SET list_method = $6, list_collection = $7, list_cursor = $8,
       list_collections_done = $9::text[], list_pages = list_pages + 1,
       enumeration_done = $10, repos_skipped_dormant = repos_skipped_dormant + $11,
       enum_lease_until = now() + make_interval(secs => $12::float8), updated_at = now()
"""
    + _ENUM_GUARD
    + "RETURNING list_pages, repos_total, repos_skipped_dormant"
)
# The relay does not implement listReposByCollection ($6: its answer): listRepos from the
# start, for good (the repos the passes found stay queued).
ENUM_FALLBACK = (
    """
UPDATE backfill_jobs
   SET list_method = 'listRepos', list_collection = NULL, list_cursor = NULL,
       list_fallback = $6, updated_at = now()
"""
    + _ENUM_GUARD
    + "RETURNING list_pages"
)
# Nothing left to ask (every pass of the current WANTED_COLLECTIONS already done).
ENUM_FINISH = (
    "UPDATE backfill_jobs SET enumeration_done = true, updated_at = now()"
    + _ENUM_GUARD
    + "RETURNING list_pages"
)

# -- the queue -----------------------------------------------------------------------------

# New repos are inserted; a known pending repo only gains priority. Done, failed or in-flight
# repos are left alone (a done repo is never downloaded again). `inserted` feeds repos_total.
REPOS_ENQUEUE = """
WITH touched AS (
    INSERT INTO backfill_repos AS r (job_id, did, priority)
    SELECT $1, d, $3 FROM unnest($2::text[]) AS d
    ON CONFLICT (job_id, did) DO UPDATE
       SET priority = greatest(r.priority, EXCLUDED.priority), updated_at = now()
     WHERE r.state = 'pending' AND r.priority < EXCLUDED.priority
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted, count(*) AS touched FROM touched
"""
# Enumerated repos have the lowest priority, so a known repo never changes: DO NOTHING, which
# (unlike DO UPDATE ... WHERE, that row-locks every conflicting row) leaves known rows
# unlocked. A locked priority row would be skipped by a concurrent SKIP LOCKED claim, and an
# enumerated repo would jump ahead of it (seen as a flaky priority-order test).
REPOS_ENQUEUE_NEW = """
WITH inserted AS (
    INSERT INTO backfill_repos (job_id, did, priority)
    SELECT $1, d, $3 FROM unnest($2::text[]) AS d
    ON CONFLICT (job_id, did) DO NOTHING
    RETURNING 1
)
SELECT count(*) AS inserted FROM inserted
"""
JOB_ADD_TOTAL = """
UPDATE backfill_jobs SET repos_total = repos_total + $2, updated_at = now() WHERE id = $1
"""
# `headed`: the repo had a head in `actors` when claimed (a live commit or an earlier
# snapshot wrote it), so it is not fresh and its snapshot skips the unguarded attempt
# (snapshots.write_snapshot's `maybe_fresh`): one primary-key probe here instead of a round trip
# per repo there. Headless then, it may still be headed by its write; that attempt finds out.
REPOS_CLAIM = """
WITH picked AS (
    SELECT job_id, did FROM backfill_repos
     WHERE job_id = $1 AND state = 'pending' AND next_attempt_at <= now()
     ORDER BY priority DESC, next_attempt_at
     LIMIT $3
       FOR UPDATE SKIP LOCKED
)
UPDATE backfill_repos r
   SET state = 'in_progress', lease_owner = $2,
       lease_until = now() + make_interval(secs => $4::float8), updated_at = now()
  FROM picked
 WHERE r.job_id = picked.job_id AND r.did = picked.did
RETURNING r.did, r.attempts, r.priority,
          EXISTS (SELECT 1 FROM actors a WHERE a.did = r.did AND a.rev IS NOT NULL) AS headed
"""
REPOS_RENEW = """
UPDATE backfill_repos SET lease_until = now() + make_interval(secs => $4::float8)
 WHERE job_id = $1 AND did = ANY($2::text[]) AND lease_owner = $3 AND state = 'in_progress'
"""
REPO_PROGRESS = """
UPDATE backfill_repos
   SET records = $4, bytes = $5, rev = $6,
       lease_until = now() + make_interval(secs => $7::float8), updated_at = now()
 WHERE job_id = $1 AND did = $2 AND lease_owner = $3 AND state = 'in_progress'
"""
# The 'backfill' cursor row's updated_at: the backfill's progress was saved (alone, and
# inside REPO_DONE).
BACKFILL_CURSOR_TOUCH = """
UPDATE firehose_cursor SET updated_at = now() WHERE service = 'backfill'
"""
# Done, with everything else finished repos save, in one statement and one commit (issue
# 11: three autocommit statements with a synchronous commit each had cost ~0.3 ms of CPU and
# three WAL flushes per repo, most of the fixed cost of a small repo): the repos ($2, rows
# of DONE_COLUMNS as one JSON parameter, see firehose.storage.queries.PER_ROW_JSON; several
# when they finish together, backfill/done_marks.py), the job's repos_done, this process's
# unsaved record counters ($4-$7, added whether or not the leases still held: the records
# were written either way) and the 'backfill' cursor row's updated_at. Nothing of a repo's
# row changes if its lease was lost. $8: commit asynchronously (see queue.mark_done_many).
# Returns the dids marked done.
#
# Each repo is found by its key (job_id, did), as in sql/008, through the primary key: the
# dids as an array (`ANY (ARRAY(SELECT did FROM d))`) are its index condition, and
# `state NOT IN (the other three)` is `state = 'in_progress'` (the CHECK of sql/003) in a
# form the lease index's predicate is not proved from. With the statistics of a queue that
# had nothing in flight (no lease_owner matches), the planner otherwise scanned the whole
# queue (joined on `d` alone) or, said as `state = 'in_progress'`, read the lease index by
# job_id alone, every entry left there since the last VACUUM, as the done mark of sql/008's
# comment did. The repos come as JSON, not as arrays: PostgreSQL knows an array parameter's
# length in a plan made for the values and not in the generic one, so it kept planning the
# statement anew at every run (~0.5 ms; a one-repo mark then cost 343-415 µs of its CPU
# against 171-220 for the statement of one repo before it, load 0.8-0.9). JSON rows are
# estimated alike in both plans, and the generic one is kept.
DONE_COLUMNS = (
    ("did", 'text COLLATE "C"'),
    ("rev", 'text COLLATE "C"'),
    ("records", "bigint"),
    ("bytes", "bigint"),
)
REPO_DONE = (
    """
WITH d AS ("""
    + rows_select(DONE_COLUMNS, 2)
    + """), r AS (
    UPDATE backfill_repos b
       SET state = 'done', rev = d.rev, records = d.records, bytes = d.bytes, error = NULL,
           lease_owner = NULL, lease_until = NULL, updated_at = now()
      FROM d
     WHERE b.job_id = $1 AND b.did = ANY (ARRAY(SELECT did FROM d)) AND b.did = d.did
       AND b.lease_owner = $3 AND b.state NOT IN ('pending', 'done', 'failed')
    RETURNING b.did
), touched AS (
    """
    + BACKFILL_CURSOR_TOUCH.strip()
    + """ RETURNING 1
)
UPDATE backfill_jobs
   SET repos_done = repos_done + (SELECT count(*) FROM r),
       records_received = records_received + $4,
       records_processed = records_processed + $5,
       records_skipped = records_skipped + $6,
       bytes_downloaded = bytes_downloaded + $7,
       updated_at = now()
 WHERE id = $1
RETURNING ARRAY(SELECT did FROM r) AS done, """
    + async_commit_if("$8")
    + """ AS sync
"""
)
# Back to pending after `delay_s`; attempts grows by $5 (0 for a rate-limit pause, which is
# the host's state, not the repo's fault).
REPO_RETRY = """
UPDATE backfill_repos
   SET state = 'pending', attempts = attempts + $5,
       next_attempt_at = now() + make_interval(secs => $6::float8), error = $4,
       lease_owner = NULL, lease_until = NULL, updated_at = now()
 WHERE job_id = $1 AND did = $2 AND lease_owner = $3 AND state = 'in_progress'
RETURNING attempts
"""
REPO_FAIL = """
WITH r AS (
    UPDATE backfill_repos
       SET state = 'failed', attempts = attempts + 1, error = $4,
           lease_owner = NULL, lease_until = NULL, updated_at = now()
     WHERE job_id = $1 AND did = $2 AND lease_owner = $3 AND state = 'in_progress'
    RETURNING 1
)
UPDATE backfill_jobs SET repos_failed = repos_failed + (SELECT count(*) FROM r),
       updated_at = now()
 WHERE id = $1
RETURNING (SELECT count(*) FROM r) AS changed
"""
# Stuck-work recovery: leases that expired, or whose owners are known dead ($2: owners on
# this host whose process is gone, checked at start-up, so a restart need not wait for the
# lease to expire). The interrupted attempt counts, so a repo that kills its process every
# time ends as failed instead of looping; $3 is BACKFILL_MAX_ATTEMPTS.
REPOS_RECLAIM = """
WITH r AS (
    UPDATE backfill_repos
       SET state = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,
           attempts = attempts + 1, error = 'lease expired (worker stopped or stalled)',
           next_attempt_at = now(), lease_owner = NULL, lease_until = NULL, updated_at = now()
     WHERE job_id = $1 AND state = 'in_progress'
       AND (lease_until < now() OR lease_owner = ANY($2::text[]))
    RETURNING state
)
UPDATE backfill_jobs
   SET repos_failed = repos_failed + (SELECT count(*) FROM r WHERE state = 'failed'),
       updated_at = now()
 WHERE id = $1
RETURNING (SELECT count(*) FROM r) AS reclaimed
"""
REPOS_RETRY_FAILED = """
WITH r AS (
    UPDATE backfill_repos
       SET state = 'pending', attempts = 0, next_attempt_at = now(), error = NULL,
           updated_at = now()
     WHERE job_id = $1 AND state = 'failed'
    RETURNING 1
)
UPDATE backfill_jobs
   SET repos_failed = repos_failed - (SELECT count(*) FROM r),
       status = CASE WHEN status = 'completed' AND (SELECT count(*) FROM r) > 0
                     THEN 'running' ELSE status END,
       completed_at = CASE WHEN (SELECT count(*) FROM r) > 0 THEN NULL ELSE completed_at END,
       updated_at = now()
 WHERE id = $1
RETURNING (SELECT count(*) FROM r) AS retried
"""
REPOS_BY_STATE = """
SELECT state, count(*) AS n FROM backfill_repos WHERE job_id = $1 GROUP BY state
"""
LEASE_OWNERS_ON_HOST = """
SELECT DISTINCT lease_owner FROM backfill_repos
 WHERE job_id = $1 AND state = 'in_progress' AND starts_with(lease_owner, $2)
UNION
SELECT enum_owner FROM backfill_jobs WHERE id = $1 AND starts_with(enum_owner, $2)
"""
REPOS_IN_PROGRESS = """
SELECT count(*) FROM backfill_repos WHERE job_id = $1 AND state = 'in_progress'
"""
REPOS_FAILED_SAMPLE = """
SELECT did, attempts, error FROM backfill_repos
 WHERE job_id = $1 AND state = 'failed' ORDER BY did LIMIT $2
"""

# Tables a backfill writes; VACUUM ANALYZE'd on completion with BACKFILL_VACUUM=true.
# (Identifiers are constants here, never input.)
VACUUM_TABLES = (
    "records",
    "record_tombstones",
    "actors",
    "posts",
    "likes",
    "reposts",
    "follows",
    "blocks",
    "profiles",
    "lists",
    "list_items",
    "feed_generators",
    "starter_packs",
    "backfill_repos",
    "backfill_jobs",
)
