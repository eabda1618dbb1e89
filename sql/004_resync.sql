-- 004_resync: the queue of repos to resynchronise from their PDS (sync 1.1, issue 5).
--
-- * The live stream's gate (firehose/live/gate.py, firehose/live/chain.py) finds repos whose
--   chain broke (`since`/`prevData` not matching the stored head, a `#sync` event) or whose
--   commit failed its signature check; it requests a resync in the SAME transaction as the
--   cursor that passes the event (firehose.storage.queries.BATCH_FINISH), so a crash can
--   neither lose a request nor save one for an event that will be read again.
-- * One row per repo: a new request for a repo already pending keeps that row (the reason
--   of the first request stays); a request for a repo whose resync is done or failed re-arms
--   it (pending again, attempts zeroed). A request for a repo in progress marks it `again`,
--   so the resync that is running (whose snapshot may predate the new event) is followed by
--   one more.
-- * Claimed with FOR UPDATE SKIP LOCKED under a lease (owner + expiry, database clock), like
--   backfill_repos: several workers share the queue, a crashed worker's claims come back
--   when the lease expires (backfill/resync.py).
-- * This file is never edited once it has landed (the migrator checksums it).

CREATE TABLE repo_resyncs (
    did              text COLLATE "C" PRIMARY KEY,
    reason           text NOT NULL,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    state            text NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    -- A request arrived while in progress: run once more after this one.
    again            boolean NOT NULL DEFAULT false,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_until      timestamptz,
    -- The last resync's outcome: the snapshot's rev, records written, rows removed.
    rev              text COLLATE "C",
    records          bigint NOT NULL DEFAULT 0,
    removed          bigint NOT NULL DEFAULT 0,
    error            text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- The claim: due pending requests, oldest due first.
CREATE INDEX repo_resyncs_claim_idx ON repo_resyncs (next_attempt_at) WHERE state = 'pending';
-- Stuck-work recovery: leases of in-flight resyncs.
CREATE INDEX repo_resyncs_lease_idx ON repo_resyncs (lease_until) WHERE state = 'in_progress';
