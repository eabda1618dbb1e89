-- 007_handle_at: when the stored handle was known to be current (issue 10, point 3).
--
-- Two writers set `actors.handle`: the live stream's #identity events, and the backfill,
-- which stores the handle of an account's DID document once it is verified both ways
-- (backfill/handles.py, https://atproto.com/specs/handle#handle-resolution). `handle_at` lets
-- them converge in any order (DESIGN.md invariant 2):
--   * an #identity event carrying a handle always writes it, with handle_at = now(): it is
--     applied in firehose order, and a backfill handle already stored was observed before;
--   * a backfill handle is written only over no handle, or over one whose handle_at is older
--     than the moment its DID document was fetched (less a clock margin): a handle from an
--     #identity event applied after that fetch is never overwritten.
-- NULL with a handle: set before this migration; the backfill never overwrites it.
-- This file is never edited once it has landed (the migrator checksums it).

ALTER TABLE actors ADD COLUMN handle_at timestamptz;
