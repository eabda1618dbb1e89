"""The devnet's command-line vocabulary: the names and defaults that `firehose`'s own parser
shows for `firehose devnet`, kept free of the devnet's heavy imports (aiohttp's server, the
key library, the generators).

`firehose.cli` builds one parser for every command, so whatever the devnet's options import,
every `firehose` process imports: a backfill helper (`firehose backfill helper`, one per
extra BACKFILL_PROCESSES) and `firehose status` paid ~0.13 s of CPU for a devnet they never
start. tests/test_backfill_processes.py checks that a helper's parser loads no other devnet
module but `cli` and `httpfaults`.
"""

from __future__ import annotations

DEFAULT_START_TIME_US = 1_735_689_600_000_000  # the virtual clock's start: 2025-01-01T00:00:00Z

MODEL_YEAR = "year"  # firehose.devnet.model: repos grown commit by commit over a year
MODELS = (MODEL_YEAR,)

# getRecord of a record the repo does not hold (firehose.devnet.pds).
MISSING_RECORD_PROOF = "proof"  # the reference PDS: a CAR proving absence
MISSING_RECORD_NOT_FOUND = "not-found"  # 400 RecordNotFound
MISSING_RECORD_MODES = (MISSING_RECORD_PROOF, MISSING_RECORD_NOT_FOUND)
