"""Cyclic-GC settings for a process that decodes and writes at full speed (pure, no I/O).

Decoding and row mapping allocate tens of objects per event or record (record dicts, lists,
CIDs, row tuples) that reference counting frees anyway. At CPython's default threshold (700
allocations) the young generation was collected every ~12 live events and cost ~15% of
decode + row preparation; in a backfill, whose batches hold thousands of records alive,
the older generations' passes cost more still. Memory stays bounded: only cyclic garbage
waits longer.
"""

from __future__ import annotations

import gc

# Allocations between two young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Fewer cyclic-GC passes on the hot path (see GC_GEN0_THRESHOLD); the long-lived start-up
    objects (modules, settings, pool) go to the permanent generation, out of every full
    collection. Process-wide: call it once, at start-up, in a process the service owns (the
    worker, `firehose backfill run`)."""
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    gc.freeze()
