-- 003_backfill: the backfill job and its work queue (docs/BACKFILL_CONTRACTS.md, issue 3).
--
-- * `backfill_jobs`: one row per backfill. The window is fixed when the job is created
--   (cutoff = started_at - days), so a resumed job keeps the same boundary however late it
--   resumes. Restarting with the same BACKFILL_DAYS resumes the active job; another value
--   starts a new job. At most one job is active (running or paused) at a time.
-- * `backfill_repos`: one row per (job, repo), the work queue. Claimed with
--   FOR UPDATE SKIP LOCKED under a lease (owner + expiry), so several processes, even on
--   several machines, share a job without losing or doubling work, and a crashed process's
--   repos come back when its lease expires. A repo in state `done` is never claimed again.
-- * Repo enumeration (com.atproto.sync.listRepos): the relay's cursor is an opaque string,
--   kept in `backfill_jobs.list_cursor`; `firehose_cursor` (service = 'backfill', a bigint
--   column) holds the number of listRepos pages enumerated so far, as the user guide's
--   progress query shows it.
-- * This file is never edited once it has landed (the migrator checksums it).

CREATE TABLE backfill_jobs (
    id                  bigserial PRIMARY KEY,
    days                integer NOT NULL CHECK (days > 0 OR days = -1),
    -- NULL: the whole history (BACKFILL_DAYS=-1).
    cutoff              timestamptz,
    -- The start boundary: records newer than this are the live stream's too; the rev guards
    -- make both writers converge whichever applies last.
    started_at          timestamptz NOT NULL DEFAULT now(),
    status              text NOT NULL DEFAULT 'running' CHECK (status IN
                            ('running', 'paused', 'paused_rate_limited', 'completed', 'failed')),
    relay_url           text NOT NULL,
    list_cursor         text,
    list_pages          bigint NOT NULL DEFAULT 0,
    enumeration_done    boolean NOT NULL DEFAULT false,
    -- Only one process pages through listRepos at a time; the lease lets another take over
    -- when it dies.
    enum_owner          text,
    enum_lease_until    timestamptz,
    repos_total         bigint NOT NULL DEFAULT 0,
    repos_done          bigint NOT NULL DEFAULT 0,
    repos_failed        bigint NOT NULL DEFAULT 0,
    records_received    bigint NOT NULL DEFAULT 0,
    records_processed   bigint NOT NULL DEFAULT 0,
    records_skipped     bigint NOT NULL DEFAULT 0,
    bytes_downloaded    bigint NOT NULL DEFAULT 0,
    error               text,
    summary             jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz
);
-- At most one active job: concurrent start-ups cannot create two.
CREATE UNIQUE INDEX backfill_jobs_one_active_idx ON backfill_jobs ((true))
    WHERE status IN ('running', 'paused', 'paused_rate_limited');

CREATE TABLE backfill_repos (
    job_id          bigint NOT NULL REFERENCES backfill_jobs (id) ON DELETE CASCADE,
    did             text COLLATE "C" NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    -- Higher first: BACKFILL_DIDS and `firehose backfill add` use 100, enumeration 0.
    priority        smallint NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    rev             text COLLATE "C",
    records         bigint NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,
    error           text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, did)
);
-- The claim: pending work of a job, best priority first, then due time.
CREATE INDEX backfill_repos_claim_idx ON backfill_repos (job_id, priority DESC, next_attempt_at)
    WHERE state = 'pending';
-- Stuck-work recovery: leases of in-flight repos.
CREATE INDEX backfill_repos_lease_idx ON backfill_repos (job_id, lease_until)
    WHERE state = 'in_progress';
-- `firehose backfill retry-failed` and the status page.
CREATE INDEX backfill_repos_failed_idx ON backfill_repos (job_id) WHERE state = 'failed';
