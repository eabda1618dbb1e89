-- 008_queue_at_scale: the backfill's queue of ~40 million repos stays cheap to work through.
--
-- 1. The in-flight indexes of the two work queues are keyed by the row's own key, so that a
--    statement about one repo reads only that repo's entries.
--
--    Every statement about one claimed repo (done, progress, retry, failure: backfill/queries.py,
--    backfill/resync_queries.py) names it by its primary key and checks
--    `state = 'in_progress'`, which the partial lease index also matches. When the table's
--    statistics say few rows are in flight (as they do from the first ANALYZE of a queue just
--    filled), the planner took the lease index, keyed by lease_until, and read every entry of
--    the job through a bitmap scan: an entry is left behind by every repo that was ever in
--    flight until VACUUM removes it, and a bitmap scan cannot skip the ones known dead. Measured
--    (embedded PostgreSQL, autovacuum off on the queue): marking a repo done read 329 buffers and
--    took 0.9 ms after 15,000 repos, 1,297 buffers and 4.4 ms after 60,000; autovacuum runs on
--    this table only every ~20 % of it, 8 million repos on the real network. Keyed by
--    (job_id, did), either index finds the one repo. What reads all the in-flight repos of a job
--    at once, every few seconds to minutes (stuck-work recovery, the only reader by lease_until;
--    lease renewal; the completion check), reads all their entries either way.
-- (Part 2, below: how often the queue is vacuumed.)
-- This file is never edited once it has landed (the migrator checksums it).

DROP INDEX backfill_repos_lease_idx;
CREATE INDEX backfill_repos_lease_idx ON backfill_repos (job_id, did)
    WHERE state = 'in_progress';

DROP INDEX repo_resyncs_lease_idx;
CREATE INDEX repo_resyncs_lease_idx ON repo_resyncs (did) WHERE state = 'in_progress';

-- 2. VACUUM every 200,000 dead rows of the queue, index entries included. A repo leaves two
--    dead rows (claimed, done), and its entry in the claim index stays, known dead, until a
--    VACUUM cleans the index: each claim reads past all of them, ~1 µs per 1,000 (the claim
--    index's scan 0.06 -> 0.22 ms from 0 to 160,000 repos done, autovacuum off). PostgreSQL's
--    default waits for 20 % of the table (8 million dead rows on the real network: ~10 ms per
--    claim by then), and a VACUUM with dead rows on under 2 % of the table's pages skips the
--    indexes (INDEX_CLEANUP AUTO), which is what a queue worked through in order leaves. Each
--    run reads the table's indexes whole (a few GB at 40 million repos, every ~100,000 repos).
ALTER TABLE backfill_repos SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200000,
    vacuum_index_cleanup = on
);
