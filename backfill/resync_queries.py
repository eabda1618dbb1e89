"""Named SQL of the resync queue (`repo_resyncs`, sql/004_resync.sql). Every value is a bind
parameter; durations are float seconds turned into intervals by the server, and leases compare
against the database clock (now()), as in backfill/queries.py."""

from __future__ import annotations

from firehose.storage.queries import RESYNC_REQUEST_CONFLICT

# A request from outside the live stream (`firehose resync DID...`): $1 did[], $2 reason. Same
# rules as the gate's requests (firehose.storage.queries.BATCH_HEADS): a pending row is kept,
# a running one is marked to run again, a done or failed one is re-armed.
RESYNC_REQUEST = (
    """
WITH q AS (
INSERT INTO repo_resyncs AS q (did, reason)
SELECT DISTINCT d, $2::text FROM unnest($1::text[]) AS d
"""
    + RESYNC_REQUEST_CONFLICT
    + """)
SELECT count(*) FROM q
"""
)

# Due pending requests, oldest due first, leased to $1 for $3 seconds; at most $2. SKIP LOCKED:
# two workers never get the same repo and neither waits for the other's row locks.
RESYNC_CLAIM = """
UPDATE repo_resyncs q
   SET state = 'in_progress', lease_owner = $1,
       lease_until = now() + make_interval(secs => $3::float8), updated_at = now()
  FROM (SELECT did FROM repo_resyncs
         WHERE state = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED) c
 WHERE q.did = c.did
RETURNING q.did, q.reason, q.attempts
"""

# $1 did[], $2 owner, $3 lease seconds.
RESYNC_RENEW = """
UPDATE repo_resyncs SET lease_until = now() + make_interval(secs => $3::float8)
 WHERE did = ANY($1::text[]) AND lease_owner = $2 AND state = 'in_progress'
"""

# Stuck-work recovery: expired leases, and those of $1 owners known dead, go back to pending
# with the attempt counted (a resync that kills its worker must not loop for ever), or failed
# once $2 attempts are used up. Returns how many were taken back.
RESYNC_RECLAIM = """
WITH r AS (
UPDATE repo_resyncs
   SET state = CASE WHEN attempts + 1 >= $2 THEN 'failed' ELSE 'pending' END,
       attempts = attempts + 1, again = false,
       error = coalesce(error, 'lease expired (worker stopped or stalled)'),
       lease_owner = NULL, lease_until = NULL, next_attempt_at = now(), updated_at = now()
 WHERE state = 'in_progress' AND (lease_until < now() OR lease_owner = ANY($1::text[]))
RETURNING 1)
SELECT count(*) FROM r
"""

# Lease owners of in-flight resyncs on one host ($1: '<host>:'), to find dead processes.
RESYNC_OWNERS_ON_HOST = """
SELECT DISTINCT lease_owner FROM repo_resyncs
 WHERE state = 'in_progress' AND left(lease_owner, length($1)) = $1
"""

# Success: $1 did, $2 owner, $3 rev, $4 records, $5 removed. A request that came in while it
# ran (`again`) makes it pending once more. Returns the new state (NULL: the lease was lost).
RESYNC_DONE = """
UPDATE repo_resyncs
   SET state = CASE WHEN again THEN 'pending' ELSE 'done' END, again = false, attempts = 0,
       rev = $3, records = $4, removed = $5, error = NULL,
       lease_owner = NULL, lease_until = NULL, next_attempt_at = now(), updated_at = now()
 WHERE did = $1 AND lease_owner = $2 AND state = 'in_progress'
RETURNING state
"""

# A failed attempt: $1 did, $2 owner, $3 error, $4 1 if it counts toward the maximum else 0,
# $5 delay seconds. Returns the attempts so far (NULL: the lease was lost).
RESYNC_RETRY = """
UPDATE repo_resyncs
   SET state = 'pending', attempts = attempts + $4, error = $3,
       lease_owner = NULL, lease_until = NULL,
       next_attempt_at = now() + make_interval(secs => $5::float8), updated_at = now()
 WHERE did = $1 AND lease_owner = $2 AND state = 'in_progress'
RETURNING attempts
"""

# Given up: $1 did, $2 owner, $3 error. A request that arrived meanwhile re-arms it.
RESYNC_FAIL = """
UPDATE repo_resyncs
   SET state = CASE WHEN again THEN 'pending' ELSE 'failed' END, again = false,
       attempts = CASE WHEN again THEN 0 ELSE attempts + 1 END, error = $3,
       lease_owner = NULL, lease_until = NULL, next_attempt_at = now(), updated_at = now()
 WHERE did = $1 AND lease_owner = $2 AND state = 'in_progress'
RETURNING state
"""

# Stopping: every resync of owner $1 back to pending, no attempt counted.
RESYNC_RELEASE = """
UPDATE repo_resyncs
   SET state = 'pending', lease_owner = NULL, lease_until = NULL, updated_at = now()
 WHERE lease_owner = $1 AND state = 'in_progress'
"""

# A resync requested because the live stream saw a commit from an account held inactive
# (firehose/live/chain.py): the relay passed the commit and the PDS served the repo, so the
# #account that reactivated it was missed. $1 did. A deleted account stays deleted.
RESYNC_ACTIVATE = """
UPDATE actors SET status = 'active', active = true, updated_at = now()
 WHERE did = $1 AND NOT active AND status <> 'deleted'
"""

# Counts by state (status page, CLI, metrics).
RESYNC_COUNTS = "SELECT state, count(*) AS n FROM repo_resyncs GROUP BY state"
# Pending requests only: an index-only count on the claim index, cheap enough for a gauge.
RESYNC_PENDING = "SELECT count(*) FROM repo_resyncs WHERE state = 'pending'"
