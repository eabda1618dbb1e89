-- 002: drop records_did_idx (from 001); the primary key already serves it.
--
-- Measured on the target 2-core machines, every secondary index on `records` costs ~25% of the
-- write rate (COPY + guarded upsert: ~26k rows/s with it, ~34k without). Rows of one account
-- are a primary-key range, because uri = 'at://<did>/<collection>/<rkey>' and uri is
-- COLLATE "C" (byte order):
--     SELECT * FROM records WHERE uri LIKE 'at://did:plc:abc/%';
--     -- or: WHERE uri >= 'at://did:plc:abc/' AND uri < 'at://did:plc:abc0'
-- Account deletion (firehose.storage.queries.ACTOR_PURGE) uses that range for every table.
DROP INDEX IF EXISTS records_did_idx;
