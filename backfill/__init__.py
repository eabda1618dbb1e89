"""History: repo enumeration, repo download, throttles, progress (issue 3).

Network side and pure transforms: `window` (PURE) decides which records a
``BACKFILL_DAYS`` window keeps (TID rkey time, else ``createdAt``, else kept; the cutoff is
fixed when the job is created); `relay_http` pages ``com.atproto.sync.listRepos`` on the
relay; `identity` resolves a DID to its PDS (PLC directory / ``did:web``, TTL cache, the
document's ``id`` must equal the DID); `hosts.HostClient` is the only way out to the
network: per-host concurrency, ``RateLimit-*`` slow-down and 429 pauses per host, capped
bodies, TLS verified, private addresses refused unless ``ALLOW_PRIVATE_NETWORK``, and every
failure a `FetchError` with a bounded reason and a transient flag; `download.fetch_repo`
streams ``getRepo`` through the hash-checking CAR reader into a disk spool (`blocks`), so
memory per repo is an index of 16 bytes per block, never the CAR (small repos stay in memory
within a per-process budget), and checks the commit's DID and that every MST node and record
block is present before returning a snapshot.

`group_commit` sends work that arrives while a statement runs together in the next one
(no timer): `done_marks` commits the done marks of repos that finish together in one
statement, and `repo_task` writes small repos' whole snapshots together
(firehose.storage.together); each repo's task still waits for its own.

`helpers` spreads one backfill over BACKFILL_PROCESSES processes on the same job: the
limits are split between them, so the totals the user set still hold, and a helper never
outlives the process that started it.
"""
