"""Storage: PostgreSQL through asyncpg (schema in sql/, shipped as `firehose.sql`).

Owns: the numbered migrations and their runner (migrate.py), the embedded server used when no
DATABASE_URL is given (embedded.py), the pure record -> row mapping (rows.py; for a repo
snapshot's records, without a RecordWrite each: snapshot_rows.py), the named SQL
(queries.py), the pure half of a batch (prepare.py: deduplicated writes -> rows and
statement parameters) and its one transaction (writer.py), the snapshot writers of the
backfill and resyncs (snapshots.py: one repo's batch; together.py: several small repos'
whole snapshots in a few statements for all), the unguarded load of a repo the database
has never seen, alone or several together (fresh.py), the pure rows -> COPY text transform
of its big batches (copy_text.py), and the probes that find the parts of a live batch
PostgreSQL refuses (refusals.py).

Invariants kept here (DESIGN.md):
  1. the cursor is written in the same transaction as the rows it covers (writer.apply_batch);
  2. every row remembers the repo rev that wrote it; an upsert applies only if no tombstone or
     stored row has a newer rev and the account is not deleted; a delete leaves a tombstone,
     so live events, replays and backfill snapshots converge in any order;
  5. hostile record content never fails a batch (wrong types -> NULL, oversized or
     unstorable values dropped and counted; what PostgreSQL refuses all the same is found by
     probes that never commit, and skipped alone); an edited migration stops the worker.
"""
