"""The live path: the relay's firehose, read, screened, batched and committed.

Owns: the subscribeRepos client with its reconnects and seq rules (`relay`), the bounded
queue between reader and committer (`queue`), the gate that screens decoded events before
they are batched (`gate`, with its steps `verify` for signatures and `chain` for sync 1.1's
repo chain), events -> batches (`batch`, pure) and the committer that writes each batch in
one transaction (`committer`). The worker (firehose/worker.py) composes them.

Invariants kept here (numbered as in ../shared/DESIGN.md):

* 1, the cursor never runs ahead of the data: a batch's cursor is the seq of its last event
  and commits in the batch's transaction; a dropped or unwanted event still moves it.
* 3, per-repo order: batches keep firehose order and commit one after the other.
* 4, bounded memory: the queue is bounded, and at most two batches are held beside it, so
  a slow database slows reading from the socket.
* 5, hostile input is data: a malformed frame or op is counted (firehose_invalid_total) and
  skipped; a row PostgreSQL refuses is isolated and the rest of its batch commits.
"""
