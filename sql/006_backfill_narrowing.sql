-- 006_backfill_narrowing: what the backfill's enumeration did not queue, and how it enumerates
-- (issue 9; docs/backfill-narrowing.md).
--
-- * `repos_skipped_dormant`: listRepos entries whose `rev` (the repo's latest commit) is older
--   than the job's cutoff, so the repo wrote nothing in the window and is not queued
--   (BACKFILL_SKIP_DORMANT). Added in the same transaction as the page's repos and cursor, so a
--   restart neither loses nor doubles a page's count.
-- * `list_method`: how repos are enumerated, 'listRepos' or 'listReposByCollection' (NULL until
--   the first page). Once 'listRepos' (chosen, or after a relay said it does not implement
--   listReposByCollection), the job never asks listReposByCollection again.
-- * `list_collection`: the NSID whose listReposByCollection pass `list_cursor` belongs to;
--   `list_collections_done` the NSIDs whose pass ended. One pass per exact NSID of
--   WANTED_COLLECTIONS; the queue's primary key deduplicates a repo found in several passes.
-- * `list_fallback`: why the job fell back from listReposByCollection to listRepos (the
--   relay's answer, e.g. 'HTTP 404'), for `firehose backfill status`; NULL otherwise.
-- * `list_pages` (003) keeps counting every page of either method, and so does the `backfill`
--   row of firehose_cursor, as the user guide shows it.
-- * This file is never edited once it has landed (the migrator checksums it).

ALTER TABLE backfill_jobs
    ADD COLUMN repos_skipped_dormant bigint NOT NULL DEFAULT 0,
    ADD COLUMN list_method           text
        CHECK (list_method IN ('listRepos', 'listReposByCollection')),
    ADD COLUMN list_collection       text,
    ADD COLUMN list_collections_done text[] NOT NULL DEFAULT '{}',
    ADD COLUMN list_fallback         text;
