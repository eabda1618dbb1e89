"""Turning decoded events into batches (pure: no I/O).

A batch keeps the firehose order of its events, so the writer sees each repo's ops in the
order the relay sent them (design invariant 3), and it carries the seq of its last event as
the cursor to save in the same transaction (invariant 1). Events this worker does not index
(other shards, unwanted collections, notices) still move the cursor forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from firehose.model import (
    AccountEvent,
    Batch,
    CommitEvent,
    Event,
    IdentityEvent,
)
from firehose.protocol.syntax import parse_datetime
from firehose.settings import WorkerSettings, collection_wanted


def shard_of(did: str, worker_count: int) -> int:
    """Stable shard of a DID: the same on every machine and Python run (no hash seed)."""
    digest = hashlib.sha256(did.encode()).digest()
    return int.from_bytes(digest[:8], "big") % worker_count


# A sharded worker asks whether it owns a repo several times per event (the decoder, the
# gate, the batch): a dict hit (~50 ns) instead of a SHA-256 (~0.7 µs), which had cost 8 %
# of a shard's CPU. Bounded like the decoder's caches: cleared when full, and a string longer
# than any DID (2 KB, https://atproto.com/specs/did) is never kept, so hostile input can
# neither grow it nor pin large strings in it.
SHARD_CACHE_MAX_DIDS = 100_000
_MAX_DID_CHARS = 2048


def shard_filter(
    worker: WorkerSettings, cache_max_dids: int = SHARD_CACHE_MAX_DIDS
) -> Callable[[str], bool] | None:
    """Whether this worker's shard holds a repo (None: one worker holds every repo)."""
    if worker.worker_count == 1:
        return None
    count, mine = worker.worker_count, worker.worker_id
    owned: dict[str, bool] = {}

    def owns(did: str) -> bool:
        known = owned.get(did)
        if known is None:
            known = shard_of(did, count) == mine
            if len(did) <= _MAX_DID_CHARS:
                if len(owned) >= cache_max_dids:
                    owned.clear()
                owned[did] = known
        return known

    return owns


class BatchBuilder:
    def __init__(
        self,
        wanted_collections: tuple[str, ...] = (),
        owns_did: Callable[[str], bool] | None = None,
    ) -> None:
        self._wanted = wanted_collections
        self._owns_did = owns_did
        self._batch = Batch()
        self._times: list[str] = []  # the batch's events' `time` texts, parsed in `take`

    def __len__(self) -> int:
        return self._batch.events

    def add(self, event: Event) -> None:
        if not self._advance(event):
            return  # #info and error frames carry no seq and change no rows
        batch = self._batch
        owns = self._owns_did
        # One isinstance per type, commits first (most events): a check against the union
        # of the three types cost more than the three.
        if isinstance(event, CommitEvent):
            if owns is not None and not owns(event.did):
                return
            batch.heads.append((event.did, event.rev, event.data_cid))
            if self._wanted:
                batch.writes.extend(
                    w for w in event.writes if collection_wanted(w.collection, self._wanted)
                )
            else:
                batch.writes.extend(event.writes)
        elif isinstance(event, IdentityEvent):
            if owns is None or owns(event.did):
                batch.identities.append(event)
        elif isinstance(event, AccountEvent) and (owns is None or owns(event.did)):
            batch.accounts.append(event)
        # Anything else changes no rows: #sync resynchronisation is the backfill path's job,
        # legacy #migrate and unknown types change nothing.

    def skip(self, event: Event) -> None:
        """An event the gate dropped: it moves the cursor and changes no rows."""
        self._advance(event)

    def request_resync(self, did: str, reason: str) -> None:
        if self._owns_did is None or self._owns_did(did):
            self._batch.resyncs.append((did, reason))

    def _advance(self, event: Event) -> bool:
        seq = getattr(event, "seq", None)
        if seq is None:
            return False
        batch = self._batch
        batch.events += 1
        batch.cursor = seq
        event_time = getattr(event, "time", None)
        if event_time is not None:
            self._times.append(event_time)
        return True

    def take(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        times, self._times = self._times, []
        # The last event's time that is a valid atproto datetime (an invalid one is no time):
        # one parse per batch where the decoder parsed every event (firehose.model).
        for text in reversed(times):
            parsed = parse_datetime(text)
            if parsed is not None:
                batch.last_event_time = parsed
                break
        return batch
