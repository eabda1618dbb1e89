-- 008_lease_index_by_did: the in-flight indexes of the two work queues are keyed by the row's
-- own key, so that a statement about one repo reads only that repo's entries.
--
-- Every statement about one claimed repo (done, progress, retry, failure: backfill/queries.py,
-- backfill/resync_queries.py) names it by its primary key and checks
-- `state = 'in_progress'`, which the partial lease index also matches. When the table's
-- statistics say few rows are in flight (as they do from the first ANALYZE of a queue just
-- filled), the planner took the lease index, keyed by lease_until, and read every entry of
-- the job through a bitmap scan: an entry is left behind by every repo that was ever in
-- flight until VACUUM removes it, and a bitmap scan cannot skip the ones known dead. Measured
-- (embedded PostgreSQL, autovacuum off on the queue): marking a repo done read 329 buffers and
-- took 0.9 ms after 15,000 repos, 1,297 buffers and 4.4 ms after 60,000; autovacuum runs on
-- this table only every ~20 % of it, 8 million repos on the real network. Keyed by
-- (job_id, did), either index finds the one repo. What reads all the in-flight repos of a job
-- at once, every few seconds to minutes (stuck-work recovery, the only reader by lease_until;
-- lease renewal; the completion check), reads all their entries either way.
-- This file is never edited once it has landed (the migrator checksums it).

DROP INDEX backfill_repos_lease_idx;
CREATE INDEX backfill_repos_lease_idx ON backfill_repos (job_id, did)
    WHERE state = 'in_progress';

DROP INDEX repo_resyncs_lease_idx;
CREATE INDEX repo_resyncs_lease_idx ON repo_resyncs (did) WHERE state = 'in_progress';
