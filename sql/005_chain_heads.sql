-- 005_chain_heads: the repo head the sync 1.1 chain checks compare with (issue 5).
--
-- `actors.rev` / `data_cid` is the newest rev any writer applied, including a backfill
-- snapshot. A backfill snapshot writes the records of its window at its rev but removes
-- nothing, so the rows of a repo are NOT "the repo at that rev": a live commit older than the
-- snapshot (a delete of a record the live stream had created) must still be applied. The chain
-- checks (firehose/live/chain.py) therefore compare with `chain_rev` / `chain_data_cid`: the
-- last commit the live stream applied, or the rev of a resync (backfill/resync.py), which
-- writes the whole repo AND removes what it no longer has. Both never go backwards. NULL:
-- unknown (rows from before this migration, repos only the backfill has seen), not compared.
-- This file is never edited once it has landed (the migrator checksums it).

ALTER TABLE actors ADD COLUMN chain_rev text COLLATE "C";
ALTER TABLE actors ADD COLUMN chain_data_cid text;
