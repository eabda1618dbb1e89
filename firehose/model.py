"""Values that flow between the decoder, the pipeline and storage.

Everything here is plain data: the protocol decoder produces these values from bytes, the
storage layer consumes them. Treat them as immutable; they are not `frozen` only because a
frozen dataclass costs several microseconds more to build, and the decoder builds several
per event on the hot path. Names follow the atproto specification (`seq`, `did`, `rev`,
`rkey`, `cid`, `cursor`).

An event's `time` is the frame's `time` text as sent (None when absent, not a string or
longer than any atproto datetime), not parsed: only a batch's last valid one is
(firehose.live.batch), since parsing every event's cost 4.6 % of decoding a frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


# Account statuses named by com.atproto.sync.subscribeRepos#account. `active` is ours: the
# event says `active: true` and carries no status.
ACCOUNT_STATUS_ACTIVE = "active"
ACCOUNT_STATUS_DELETED = "deleted"

# The greatest `seq`, hence cursor: the data model's integers are signed 64-bit, the cursor
# columns are PostgreSQL `bigint`, and the cursor goes back to the relay as `?cursor=`. A
# frame's seq outside 0..SEQ_MAX is malformed (firehose.protocol.frames); START_CURSOR too.
SEQ_MAX = 2**63 - 1


@dataclass(slots=True)
class RecordWrite:
    """One record operation, ready for storage.

    `record` is the record in the atproto JSON form (links as ``{"$link": cid}``, bytes as
    ``{"$bytes": base64}``) with NUL characters already replaced, so PostgreSQL accepts it;
    `sanitized` says whether that happened. `cid` and `record` are ``None`` for deletes.
    `rev` is the repo revision (a TID) of the commit or snapshot that carried the op: the
    storage layer applies a write only if no newer rev has touched the same uri.
    """

    did: str
    collection: str
    rkey: str
    rev: str
    action: Action
    cid: str | None = None
    record: dict[str, Any] | None = None
    sanitized: bool = False

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


# A record of one repo's snapshot (the backfill's download), created at `rev`:
# (collection, rkey, rev, cid, record, sanitized), the fields of a CREATE `RecordWrite` of
# the snapshot's did, as a plain tuple. A repo's whole snapshot is hundreds of them, and a
# RecordWrite cost about six times a tuple to build (185 against 27 ns here); the writer
# turns them into rows directly (firehose.storage.snapshot_rows).
SnapshotRecord = tuple[str, str, str, str | None, dict[str, Any] | None, bool]


def snapshot_write(did: str, item: SnapshotRecord) -> RecordWrite:
    """The RecordWrite a snapshot record stands for."""
    collection, rkey, rev, cid, record, sanitized = item
    return RecordWrite(did, collection, rkey, rev, Action.CREATE, cid, record, sanitized)


def snapshot_record(write: RecordWrite) -> SnapshotRecord:
    """A create's fields as a snapshot record of its did (the profile a window download
    fetches with getRecord, at its own commit's rev)."""
    w = write
    return (w.collection, w.rkey, w.rev, w.cid, w.record, w.sanitized)


@dataclass(slots=True)
class CommitEvent:
    """A `#commit` frame, its CAR already verified and its ops resolved to records."""

    seq: int
    did: str
    rev: str
    since: str | None
    # The frame's `commit` link, binary (36 bytes); `commit_cid` is its text. Not encoded
    # while decoding: nothing on the live path reads it, and the text cost ~2,700
    # instructions per frame, 1.8 % of decoding one (bench/instructions.py).
    commit: bytes
    prev_data: str | None
    time: str | None  # as sent, not parsed: module docstring
    writes: tuple[RecordWrite, ...]
    too_big: bool = False
    # Ops that could not be resolved (record block missing from the CAR, bad path, ...):
    # (reason, detail) pairs the worker counts under firehose_invalid_total.
    invalid_ops: tuple[tuple[str, str], ...] = ()
    # The signed commit's `data`: the repo's MST root after this commit.
    data_cid: str | None = None
    # The commit block's raw DAG-CBOR (hash-checked against `commit`), kept so the gate can
    # verify its signature (firehose.live.verify); a reference into the CAR, no copy.
    commit_block: bytes | None = None

    @property
    def commit_cid(self) -> str:
        """The commit's CID as text (``bafyrei...``)."""
        from firehose.protocol.cid import cid_str_from_bytes  # protocol imports this module

        return cid_str_from_bytes(self.commit)


@dataclass(slots=True)
class SyncEvent:
    """A `#sync` frame: the repo's state was reset to `commit_cid` at `rev`."""

    seq: int
    did: str
    rev: str
    commit_cid: str
    time: str | None  # as sent, not parsed: module docstring
    commit_block: bytes | None = None  # the signed commit's raw DAG-CBOR, as in CommitEvent


@dataclass(slots=True)
class IdentityEvent:
    """`#identity` (or legacy `#handle`): the DID document or handle may have changed."""

    seq: int
    did: str
    time: str | None  # as sent, not parsed: module docstring
    handle: str | None = None


@dataclass(slots=True)
class AccountEvent:
    """`#account` (or legacy `#tombstone`, which means deleted)."""

    seq: int
    did: str
    time: str | None  # as sent, not parsed: module docstring
    active: bool
    status: str | None = None

    @property
    def effective_status(self) -> str:
        if self.active:
            return ACCOUNT_STATUS_ACTIVE
        return self.status or "deactivated"


@dataclass(slots=True)
class InfoEvent:
    """`#info`: informational, e.g. ``OutdatedCursor``. Carries no seq."""

    name: str
    message: str | None = None


@dataclass(slots=True)
class ErrorFrame:
    """An error frame (header ``op = -1``), e.g. ``FutureCursor`` or ``ConsumerTooSlow``."""

    error: str
    message: str | None = None


@dataclass(slots=True)
class IgnoredEvent:
    """A frame we decode but do not index (legacy `#migrate`, unknown future types).

    It still carries its seq (when it has one) so the cursor advances past it.
    """

    seq: int | None
    kind: str
    did: str | None = None
    time: str | None = None  # as sent, not parsed: module docstring


@dataclass(slots=True)
class OtherShardEvent:
    """A repo's event that belongs to another worker's shard (``WORKER_COUNT`` > 1).

    Read only as far as its seq and time: it moves this worker's cursor and lag, and changes
    no rows here. `event_type` names the event it would have decoded to (``CommitEvent``...),
    so that firehose_events_total still counts what was read from the relay by type.
    """

    seq: int
    event_type: str
    time: str | None = None  # as sent, not parsed: module docstring


Event = (
    CommitEvent
    | SyncEvent
    | IdentityEvent
    | AccountEvent
    | InfoEvent
    | ErrorFrame
    | IgnoredEvent
    | OtherShardEvent
)


@dataclass(slots=True)
class Batch:
    """What one database transaction applies: rows plus the cursor that covers them.

    Invariant 1 of the design: `cursor` is written in the same transaction as the rows of
    every event whose seq is <= cursor, so the cursor never runs ahead of the data.
    """

    writes: list[RecordWrite] = field(default_factory=list)
    identities: list[IdentityEvent] = field(default_factory=list)
    accounts: list[AccountEvent] = field(default_factory=list)
    # Per commit, the repo head it leaves: (did, rev, data_cid), kept in `actors` so the next
    # commit's `since`/`prevData` can be checked against it (sync 1.1).
    heads: list[tuple[str, str, str | None]] = field(default_factory=list)
    # Repos the gate (firehose.live.gate) found desynchronized or forged: (did, reason),
    # queued for a resync in the same transaction as the cursor.
    resyncs: list[tuple[str, str]] = field(default_factory=list)
    cursor: int | None = None
    last_event_time: datetime | None = None
    events: int = 0
