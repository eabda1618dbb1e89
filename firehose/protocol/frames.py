"""`com.atproto.sync.subscribeRepos` frames -> `firehose.model` events.

A frame (https://atproto.com/specs/event-stream#framing) is two concatenated DAG-CBOR
objects: a header ``{op, t}`` and a body. ``op = 1`` is a message whose type is ``t``;
``op = -1`` is an error whose body is ``{error, message?}``. Bodies follow the
subscribeRepos lexicon (https://github.com/bluesky-social/atproto/blob/main/lexicons/com/atproto/sync/subscribeRepos.json).

For ``#commit`` the ``blocks`` CAR is read, the commit object is found and must name the
same DID as the frame (a relay bug or forgery otherwise), and each op becomes a
`RecordWrite`. The blocks read (the commit, each op's record) are hash-checked as they are
read (`read_car_lazily`); the MST nodes of the commit's proof, which nothing here reads, are
not. A bad op (record block missing, bad path, undecodable record) does not spoil the
frame: it goes to ``invalid_ops`` and the other ops are kept, because dropping a whole
commit would silently lose its valid writes. A bad frame (header, body fields, CAR, commit,
a block read that does not match its CID) raises `ProtocolError`: a record block that
fails its hash is a forgery or a corruption of the commit itself, and skipping the whole
commit leaves the repo's chain broken at the next one, which queues a resync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firehose.model import (
    ACCOUNT_STATUS_DELETED,
    SEQ_MAX,
    AccountEvent,
    Action,
    CommitEvent,
    ErrorFrame,
    Event,
    IdentityEvent,
    IgnoredEvent,
    InfoEvent,
    OtherShardEvent,
    RecordWrite,
    SyncEvent,
)
from firehose.protocol.car import LazyCar, read_car_lazily
from firehose.protocol.cbor import decode_block, decode_multi, decode_record
from firehose.protocol.cid import (
    CID_BYTES,
    SUPPORTED_PREFIXES,
    cid_str_from_bytes,
    is_supported_cid,
)
from firehose.protocol.cid import _encode_cid as _encode_cid
from firehose.protocol.errors import FrameError, ProtocolError
from firehose.protocol.syntax import (
    DATETIME_MAX_CHARS,
    is_did,
    is_handle,
    is_nsid,
    is_record_key,
    is_tid,
    is_token,
)

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Size limits for one frame; anything larger is rejected with reason ``too_large``.

    The lexicon caps ``#commit.blocks`` at 2,000,000 bytes (raised from 1,000,000 with sync
    v1.1) and ``ops`` at 200. We allow a little more blocks slack (2 MiB) and 5x the op
    count, so a slightly non-conforming PDS does not lose data, while still bounding the
    work one frame can cause. The websocket client should use `max_frame_bytes` as its
    message size limit too.
    """

    max_frame_bytes: int = 5 * MIB
    max_blocks_bytes: int = 2 * MIB
    max_block_bytes: int = 1 * MIB
    max_blocks: int = 20_000  # a 2 MiB CAR holds at most ~2 MiB / 37 B sections anyway
    max_ops: int = 1000


DEFAULT_LIMITS = FrameLimits()
_OP_MESSAGE = 1
_OP_ERROR = -1
_ACTIONS = {"create": Action.CREATE, "update": Action.UPDATE, "delete": Action.DELETE}
_CREATE = Action.CREATE
_UPDATE = Action.UPDATE
_BLOCK_HASH = "block_hash"
_MAX_PATH_CHARS = 1024  # NSID (317) + "/" + record key (512), rounded up
# Validated collection NSIDs and repo DIDs: a handful of collections and a working set of
# active accounts cover almost every op, and a dict hit (~50 ns) replaces a regex match
# (~1-2 us). Only valid values are remembered, and each cache is cleared when full, so
# hostile input can neither poison it nor grow it beyond the bound.
_NSID_CACHE_MAX = 1024
_DID_CACHE_MAX = 100_000  # ~10 MB at most (a DID is ~32 chars)
_valid_nsids: dict[str, bool] = {}
_valid_dids: dict[str, bool] = {}


def _nsid_ok(collection: str) -> bool:
    if collection in _valid_nsids:
        return True
    if not is_nsid(collection):
        return False
    if len(_valid_nsids) >= _NSID_CACHE_MAX:
        _valid_nsids.clear()
    _valid_nsids[collection] = True
    return True


def _did_ok(did: str) -> bool:
    if did in _valid_dids:
        return True
    if not is_did(did):
        return False
    if len(_valid_dids) >= _DID_CACHE_MAX:
        _valid_dids.clear()
    _valid_dids[did] = True
    return True


def decode_frame(
    data: bytes,
    limits: FrameLimits = DEFAULT_LIMITS,
    owns_did: Callable[[str], bool] | None = None,
) -> Event:
    """Decode one binary websocket message. Raises ProtocolError (only) on bad input.

    With `owns_did` (a sharded worker's filter), a repo's event whose DID it refuses is read
    only as far as its seq and time (`OtherShardEvent`): its blocks, records and fields are
    the owning worker's to decode and check, so each event is decoded in full once across
    the shards instead of once per shard. A DID field that is missing or not a string is
    left to the full decoder, which reports the malformed body.
    """
    if len(data) > limits.max_frame_bytes:
        raise FrameError(f"frame of {len(data)} bytes", "too_large")
    parts = decode_multi(data)
    if len(parts) != 2:
        raise FrameError(f"frame has {len(parts)} objects, expected header and body", "header")
    header, body = parts
    if type(header) is not dict:
        raise FrameError("header is not a map", "header")
    if type(body) is not dict:
        raise FrameError("body is not a map")
    op = header.get("op")
    if op == _OP_MESSAGE and type(op) is int:
        kind = header.get("t")
        if type(kind) is not str:
            raise FrameError("header has no message type 't'", "header")
        handler = _HANDLERS.get(kind)
        if handler is None:
            return _ignored(kind, body)
        if owns_did is not None and kind in _REPO_EVENTS:
            field, event_type = _REPO_EVENTS[kind]
            did = body.get(field)
            if type(did) is str and not owns_did(did):
                return OtherShardEvent(_req_seq(body), event_type, _time(body))
        return handler(body, limits)
    if op == _OP_ERROR and type(op) is int:
        return ErrorFrame(_req_str(body, "error"), _opt_str(body, "message"))
    raise FrameError(f"unknown header op {op!r}"[:80], "header")


# --- field helpers: a missing or mistyped field is a malformed body (reason "body") ---


# A seq outside 0..SEQ_MAX (firehose.model) from a hostile relay would otherwise decode and
# then fail the whole batch's statements on every replay.
def _req_seq(body: dict[str, Any]) -> int:
    seq = body.get("seq")
    if type(seq) is not int:
        raise FrameError("field 'seq' must be an integer")
    if not 0 <= seq <= SEQ_MAX:
        raise FrameError(f"field 'seq' outside 0..2^63-1: {seq}"[:120])
    return seq


def _req_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if type(value) is not str:
        raise FrameError(f"field {key!r} must be a string")
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and type(value) is not str:
        raise FrameError(f"field {key!r} must be a string or null")
    return value


def _req_did(body: dict[str, Any], key: str) -> str:
    did = _req_str(body, key)
    if not _did_ok(did):
        raise FrameError(f"field {key!r} is not a DID: {did[:60]!r}", "syntax")
    return did


def _req_link(body: dict[str, Any], key: str) -> bytes:
    value = body.get(key)
    if not is_supported_cid(value):
        raise FrameError(f"field {key!r} must be a CID link")
    return value


def _opt_link_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not bytes:
        raise FrameError(f"field {key!r} must be a CID link or null")
    return cid_str_from_bytes(value)


def _time(body: dict[str, Any]) -> str | None:
    """The event's `time` as sent (firehose.model's docstring): a batch parses its last one.
    A text longer than any atproto datetime is no time, so that a hostile frame cannot keep a
    big string alive in the queue with its event."""
    value = body.get("time")
    return value if type(value) is str and len(value) <= DATETIME_MAX_CHARS else None


def _rev(body: dict[str, Any], key: str = "rev") -> str:
    rev = _req_str(body, key)
    # Storage orders writes by rev compared as text: only a TID keeps that meaningful.
    if not is_tid(rev):
        raise FrameError(f"{key} is not a TID: {rev[:20]!r}", "syntax")
    return rev


def _read_blocks(body: dict[str, Any], limits: FrameLimits) -> LazyCar:
    blocks = body.get("blocks")
    if type(blocks) is not bytes:
        raise FrameError("field 'blocks' must be bytes")
    if len(blocks) > limits.max_blocks_bytes:
        raise FrameError(f"blocks CAR of {len(blocks)} bytes", "too_large")
    return read_car_lazily(
        blocks, max_block_bytes=limits.max_block_bytes, max_blocks=limits.max_blocks
    )


def _commit_object(car: LazyCar, commit_cid: bytes, did: str) -> tuple[dict[str, Any], bytes]:
    """The signed commit object (https://atproto.com/specs/repository#commit-objects) and its
    hash-checked block."""
    block = car.block(commit_cid)
    if block is None:
        raise FrameError("commit block is not in the CAR", "missing_block")
    commit = decode_block(block)
    if type(commit) is not dict:
        raise FrameError("commit object is not a map")
    if commit.get("did") != did:
        raise FrameError(f"commit is for {str(commit.get('did'))[:60]!r}, frame for {did!r}")
    return commit, block


# --- message types ---


def _commit(body: dict[str, Any], limits: FrameLimits) -> CommitEvent:
    seq = _req_seq(body)
    did = _req_did(body, "repo")
    rev = _rev(body)
    since = _opt_str(body, "since")
    commit_cid = _req_link(body, "commit")
    ops = body.get("ops")
    if type(ops) is not list:
        raise FrameError("field 'ops' must be an array")
    if len(ops) > limits.max_ops:
        raise FrameError(f"{len(ops)} ops", "too_large")
    too_big = body.get("tooBig") is True
    car = _read_blocks(body, limits)
    commit, commit_block = _commit_object(car, commit_cid, did)
    if commit.get("rev", rev) != rev:
        raise FrameError("commit object rev differs from the frame rev")
    writes: list[RecordWrite] = []
    invalid: list[tuple[str, str]] = []
    for op in ops:
        try:
            writes.append(_record_write(op, did, rev, car))
        except ProtocolError as exc:
            if exc.reason == _BLOCK_HASH:
                raise  # the frame is forged or corrupted: see the module docstring
            path = op.get("path") if type(op) is dict else None
            where = path[:120] if type(path) is str else "?"
            invalid.append((exc.reason, f"{where}: {exc.detail}"[:200]))
    # Positional, in the field order (the names are the fields' but where noted): with
    # keywords this twelve-field dataclass cost 664 against 245 ns per call, once per frame.
    return CommitEvent(
        seq,
        did,
        rev,
        since,
        commit_cid,  # commit
        _opt_link_str(body, "prevData"),  # prev_data
        _time(body),  # time
        tuple(writes),
        too_big,
        tuple(invalid),  # invalid_ops
        _data_cid(commit),
        commit_block,
    )


def _data_cid(commit: dict[str, Any]) -> str | None:
    """The commit's MST root (`data`): the repo head that the next commit's prevData names."""
    data = commit.get("data")
    # Only a CID this module accepts (a 36-byte value of another shape is no CID for it: the
    # encoder would spell any 36 bytes, and a decoder error here is no ProtocolError).
    if is_supported_cid(data):
        return _encode_cid(data)
    return None


def _record_write(op: Any, did: str, rev: str, car: LazyCar) -> RecordWrite:
    if type(op) is not dict:
        raise FrameError("op is not a map", "bad_op")
    raw_action = op.get("action")
    action = _ACTIONS.get(raw_action) if type(raw_action) is str else None
    if action is None:
        raise FrameError(f"unknown action {str(op.get('action'))[:20]!r}", "bad_op")
    path = op.get("path")
    if type(path) is not str or len(path) > _MAX_PATH_CHARS:
        raise FrameError("path must be a string", "bad_op")
    collection, sep, rkey = path.partition("/")
    if not sep or not _nsid_ok(collection) or not is_record_key(rkey):
        raise FrameError("path is not collection/rkey", "syntax")
    if action is not _CREATE and action is not _UPDATE:
        return RecordWrite(did, collection, rkey, rev, action)
    cid = op.get("cid")
    if type(cid) is not bytes or len(cid) != CID_BYTES or cid[:4] not in SUPPORTED_PREFIXES:
        raise FrameError(f"{action.value} without a valid record cid", "bad_op")
    block = car.block(cid)
    if block is None:
        raise FrameError("record block is not in the CAR", "missing_block")
    record, sanitized = decode_record(block)
    return RecordWrite(did, collection, rkey, rev, action, _encode_cid(cid), record, sanitized)


def _sync(body: dict[str, Any], limits: FrameLimits) -> SyncEvent:
    seq = _req_seq(body)
    did = _req_did(body, "did")
    rev = _rev(body)
    car = _read_blocks(body, limits)
    # The #sync CAR holds just the commit block, and its root is that commit.
    commit, commit_block = _commit_object(car, car.root_cid, did)
    if commit.get("rev", rev) != rev:
        raise FrameError("commit object rev differs from the frame rev")
    return SyncEvent(
        seq=seq,
        did=did,
        rev=rev,
        commit_cid=car.root,
        time=_time(body),
        commit_block=commit_block,
    )


def _identity(body: dict[str, Any], limits: FrameLimits) -> IdentityEvent:
    return IdentityEvent(
        seq=_req_seq(body),
        did=_req_did(body, "did"),
        time=_time(body),
        handle=_handle_or_none(_opt_str(body, "handle")),
    )


# #identity handles and #account statuses go to PostgreSQL text columns: one NUL in them
# failed the whole batch, retried for ever (the stream stalled, issue 5). A handle that is not
# handle syntax is unknown (None), as the lexicon allows; a status that is not a short token
# is unknown too (an inactive account then reads as `deactivated`).
def _handle_or_none(handle: str | None) -> str | None:
    return handle if handle is not None and is_handle(handle) else None


def _status_or_none(status: str | None) -> str | None:
    return status if status is not None and is_token(status) else None


def _handle(body: dict[str, Any], limits: FrameLimits) -> IdentityEvent:
    # Legacy #handle: {seq, did, handle, time}; superseded by #identity.
    return IdentityEvent(
        seq=_req_seq(body),
        did=_req_did(body, "did"),
        time=_time(body),
        handle=_handle_or_none(_req_str(body, "handle")),
    )


def _account(body: dict[str, Any], limits: FrameLimits) -> AccountEvent:
    active = body.get("active")
    if type(active) is not bool:
        raise FrameError("field 'active' must be a boolean")
    return AccountEvent(
        seq=_req_seq(body),
        did=_req_did(body, "did"),
        time=_time(body),
        active=active,
        status=_status_or_none(_opt_str(body, "status")),
    )


def _tombstone(body: dict[str, Any], limits: FrameLimits) -> AccountEvent:
    # Legacy #tombstone: the account was deleted (now #account active=false status=deleted).
    return AccountEvent(
        seq=_req_seq(body),
        did=_req_did(body, "did"),
        time=_time(body),
        active=False,
        status=ACCOUNT_STATUS_DELETED,
    )


def _info(body: dict[str, Any], limits: FrameLimits) -> InfoEvent:
    return InfoEvent(name=_req_str(body, "name"), message=_opt_str(body, "message"))


def _ignored(kind: str, body: dict[str, Any]) -> IgnoredEvent:
    # Unknown types are skipped, not errors: the lexicon may add types (forward compat),
    # but we keep the seq so the cursor advances past them.
    seq = body.get("seq")
    did = body.get("did", body.get("repo"))
    return IgnoredEvent(
        seq=seq if type(seq) is int and 0 <= seq <= SEQ_MAX else None,
        kind=kind[:64],
        did=did if type(did) is str and is_did(did) else None,
        time=_time(body),
    )


# The repo events a shard filter applies to: the body field naming the repo, and the event
# type the full decode gives (what firehose_events_total counts it as).
_REPO_EVENTS = {
    "#commit": ("repo", "CommitEvent"),
    "#sync": ("did", "SyncEvent"),
    "#identity": ("did", "IdentityEvent"),
    "#handle": ("did", "IdentityEvent"),
    "#account": ("did", "AccountEvent"),
    "#tombstone": ("did", "AccountEvent"),
}

_HANDLERS: dict[str, Any] = {
    "#commit": _commit,
    "#sync": _sync,
    "#identity": _identity,
    "#account": _account,
    "#info": _info,
    "#handle": _handle,
    "#tombstone": _tombstone,
}
