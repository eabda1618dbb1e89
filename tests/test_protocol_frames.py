"""subscribeRepos frames: captured relay traffic, production commit bodies, every type."""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import pytest
from test_protocol_support import (
    b64decode_loose,
    cid_bytes,
    commit_bodies,
    dag_cbor,
    frame,
    relay_messages,
)

from firehose.model import (
    AccountEvent,
    Action,
    CommitEvent,
    ErrorFrame,
    IdentityEvent,
    IgnoredEvent,
    InfoEvent,
    SyncEvent,
)
from firehose.protocol.car import read_car, read_car_lazily, read_varint
from firehose.protocol.cid import CID_BYTES
from firehose.protocol.errors import REASONS, ProtocolError
from firehose.protocol.frames import FrameLimits, decode_frame

EXPECTED_TYPES = {"#commit": CommitEvent, "#sync": SyncEvent, "#identity": IdentityEvent}
EXPECTED_TYPES["#account"] = AccountEvent


@pytest.mark.parametrize(("scenario", "message"), relay_messages(), ids=lambda v: str(v)[:30])
def test_captured_relay_frames(scenario: str, message: dict[str, Any]) -> None:
    header, body = message["frame"]["header"], message["frame"]["body"]
    data = frame(header, body)
    if message.get("drop") and scenario == "rev_ordering" and header["t"] == "#commit":
        # The relay drops these; two of them are also malformed (a rev that is not a TID, a
        # body rev that differs from the signed commit's), which we reject outright.
        try:
            event = decode_frame(data)
        except ProtocolError as err:
            assert err.reason in ("syntax", "body")
            return
    else:
        event = decode_frame(data)
    assert isinstance(event, EXPECTED_TYPES[header["t"]])
    if isinstance(event, CommitEvent):
        assert event.seq == body["seq"] and event.did == body["repo"]
        assert event.commit_cid == body["commit"]["$link"] and event.invalid_ops == ()
        assert len(event.writes) == len(body["ops"])
        for write, op in zip(event.writes, body["ops"], strict=True):
            assert f"{write.collection}/{write.rkey}" == op["path"]
            assert write.action.value == op["action"]
            if write.action is Action.DELETE:
                assert write.cid is None and write.record is None
            else:
                assert write.cid == op["cid"]["$link"] and write.record is not None
                assert write.record["$type"] == write.collection
        assert event.time is not None
        assert event.prev_data == (body.get("prevData") or {}).get("$link")
    elif isinstance(event, SyncEvent):
        assert event.did == body["did"] and event.rev == body["rev"]
    elif isinstance(event, AccountEvent):
        assert event.active == body["active"] and event.status == body.get("status")


def test_relay_scenarios_cover_every_type() -> None:
    kinds = [m["frame"]["header"]["t"] for _, m in relay_messages()]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "#commit": 25,
        "#sync": 1,
        "#identity": 3,
        "#account": 6,
    }


@pytest.mark.parametrize(("name", "body"), commit_bodies(), ids=lambda v: str(v)[:26])
def test_production_commit_bodies(name: str, body: dict[str, Any]) -> None:
    event = decode_frame(frame({"op": 1, "t": "#commit"}, body))
    assert isinstance(event, CommitEvent) and event.invalid_ops == ()
    assert len(event.writes) == len(body["ops"]) and event.seq == body["seq"]


def commit_body() -> dict[str, Any]:
    return copy.deepcopy(next(b for n, b in commit_bodies() if n.endswith("4623075231")))


def commit_frame(body: dict[str, Any]) -> bytes:
    return frame({"op": 1, "t": "#commit"}, body)


def test_missing_record_block_goes_to_invalid_ops() -> None:
    body = commit_body()
    op = body["ops"][0]
    body["ops"].append({**op, "path": "app.bsky.feed.post/3abc", "cid": {"$link": missing()}})
    body["ops"].append({**op, "path": "not a path"})
    body["ops"].append({**op, "action": "frobnicate"})
    body["ops"].append({**op, "action": ["unhashable"]})
    event = decode_frame(commit_frame(body))
    assert isinstance(event, CommitEvent) and len(event.writes) == 1
    reasons = [reason for reason, _ in event.invalid_ops]
    assert reasons == ["missing_block", "syntax", "bad_op", "bad_op"]
    assert all(len(detail) <= 200 for _, detail in event.invalid_ops)


def missing() -> str:
    from firehose.protocol.cid import cid_for_dag_cbor

    return cid_for_dag_cbor(hashlib.sha256(b"absent").digest())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("seq"), "body"),
        (lambda b: b.update(seq="1"), "body"),
        # A seq is stored as bigint and sent back as the cursor: beyond the data model's
        # signed 64 bits it would fail the batch's statements at every replay.
        (lambda b: b.update(seq=2**63), "body"),
        (lambda b: b.update(seq=2**64 - 1), "body"),
        (lambda b: b.update(seq=-1), "body"),
        (lambda b: b.update(repo="did:plc:someoneelse"), "body"),
        (lambda b: b.update(repo="not-a-did"), "syntax"),
        (lambda b: b.update(commit={"$link": missing()}), "missing_block"),
        (lambda b: b.update(blocks={"$bytes": "AAAA"}), "car"),
        (lambda b: b.update(ops="nope"), "body"),
    ],
)
def test_bad_commit_bodies(mutate: Any, reason: str) -> None:
    body = commit_body()
    mutate(body)
    with pytest.raises(ProtocolError) as err:
        decode_frame(commit_frame(body))
    assert err.value.reason == reason


def test_limits_give_too_large() -> None:
    data = commit_frame(commit_body())
    for limits in (
        FrameLimits(max_frame_bytes=100),
        FrameLimits(max_blocks_bytes=100),
        FrameLimits(max_block_bytes=10),
        FrameLimits(max_ops=0),
    ):
        with pytest.raises(ProtocolError) as err:
            decode_frame(data, limits)
        assert err.value.reason == "too_large"


def simple(t: str, body: dict[str, Any]) -> Any:
    return decode_frame(dag_cbor({"op": 1, "t": t}) + dag_cbor(body))


DID = "did:plc:44ybard66vv44zksje25o7dz"
TIME = "2025-03-01T12:00:00.000Z"


def test_other_message_types() -> None:
    ident = simple("#identity", {"seq": 5, "did": DID, "time": TIME, "handle": "a.example.com"})
    assert ident == IdentityEvent(5, DID, ident.time, "a.example.com") and ident.time is not None
    acct = simple(
        "#account", {"seq": 6, "did": DID, "time": TIME, "active": False, "status": "takendown"}
    )
    assert isinstance(acct, AccountEvent) and acct.effective_status == "takendown"
    assert simple("#info", {"name": "OutdatedCursor"}) == InfoEvent("OutdatedCursor", None)
    handle = simple("#handle", {"seq": 7, "did": DID, "handle": "b.example.com", "time": "bad"})
    # The time as sent, even when it is none: a batch parses only its last valid one. One
    # longer than any datetime is dropped: the event would keep it alive in the queue.
    assert handle == IdentityEvent(7, DID, "bad", "b.example.com")
    long = simple("#identity", {"seq": 8, "did": DID, "time": TIME + " " * 1_000_000})
    assert isinstance(long, IdentityEvent) and long.time is None
    tomb = simple("#tombstone", {"seq": 8, "did": DID, "time": TIME})
    assert isinstance(tomb, AccountEvent) and tomb.effective_status == "deleted"
    migrate = simple("#migrate", {"seq": 9, "did": DID, "migrateTo": None, "time": TIME})
    assert isinstance(migrate, IgnoredEvent) and migrate.seq == 9 and migrate.did == DID
    assert simple("#identity", {"seq": 2**63 - 1, "did": DID}).seq == 2**63 - 1
    huge = simple("#migrate", {"seq": 2**63, "did": DID})
    assert isinstance(huge, IgnoredEvent) and huge.seq is None
    future = simple("#labels", {"seq": 10})
    assert isinstance(future, IgnoredEvent) and future.kind == "#labels"
    error = decode_frame(dag_cbor({"op": -1}) + dag_cbor({"error": "FutureCursor", "message": "x"}))
    assert error == ErrorFrame("FutureCursor", "x")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "header"),
        (b"\xff", "cbor"),
        (dag_cbor({"op": 1, "t": "#info"}), "header"),
        (dag_cbor({"op": 2, "t": "#info"}) + dag_cbor({"name": "x"}), "header"),
        (dag_cbor({"op": 1}) + dag_cbor({"name": "x"}), "header"),
        (dag_cbor([1]) + dag_cbor({}), "header"),
        (dag_cbor({"op": 1, "t": "#info"}) + dag_cbor([]), "body"),
        (dag_cbor({"op": 1, "t": "#info"}) + dag_cbor({"name": 1}), "body"),
        (dag_cbor({"op": 1, "t": "#account"}) + dag_cbor({"seq": 1, "did": DID}), "body"),
        (dag_cbor({"op": -1}) + dag_cbor({}), "body"),
        (dag_cbor({"op": 1, "t": "#info"}) + dag_cbor({"name": "x"}) + b"\x00", "header"),
    ],
)
def test_malformed_frames(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_frame(data)
    assert err.value.reason == reason and err.value.reason in REASONS


def test_sync_from_relay_scenario_has_root_commit() -> None:
    message = next(m for _, m in relay_messages() if m["frame"]["header"]["t"] == "#sync")
    event = decode_frame(frame(message["frame"]["header"], message["frame"]["body"]))
    assert isinstance(event, SyncEvent) and event.commit_cid.startswith("bafyrei")


# --- blocks are hash-checked when read --------------------------------------------------------


def _flip_block(body: dict[str, Any], pick: Any) -> dict[str, Any]:
    """`body` with one byte flipped in the first block of its CAR that `pick(cid)` accepts,
    its CID left as it was (so the block no longer matches it)."""
    data = b64decode_loose(body["blocks"]["$bytes"])
    length, pos = read_varint(data, 0)
    pos += length  # past the header
    while True:
        length, pos = read_varint(data, pos)
        if pick(data[pos : pos + CID_BYTES]):
            break
        pos += length
    at = pos + CID_BYTES  # the block's first byte
    flipped = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    body = copy.deepcopy(body)
    body["blocks"] = {"$bytes": base64.b64encode(flipped).decode().rstrip("=")}
    return body


def _links(body: dict[str, Any]) -> set[bytes]:
    """The binary CIDs of the commit and of the ops' records: the blocks the decoder reads."""
    links = {cid_bytes(body["commit"]["$link"])}
    links.update(cid_bytes(op["cid"]["$link"]) for op in body["ops"] if op.get("cid"))
    return links


@pytest.mark.parametrize(("name", "body"), commit_bodies(), ids=lambda v: str(v)[:26])
def test_a_corrupt_block_nobody_reads_does_not_spoil_the_commit(
    name: str, body: dict[str, Any]
) -> None:
    # The MST nodes of the commit's proof: the live path never reads them, so they are not
    # hash-checked (firehose.protocol.car.read_car_lazily) and cannot fail the frame.
    read = _links(body)
    if len(read) == len(_all_cids(body)):
        pytest.skip("every block of this CAR is read")
    intact = decode_frame(commit_frame(body))
    event = decode_frame(commit_frame(_flip_block(body, lambda c: c not in read)))
    assert isinstance(event, CommitEvent) and event.invalid_ops == ()
    assert event == intact


@pytest.mark.parametrize(("name", "body"), commit_bodies(), ids=lambda v: str(v)[:26])
@pytest.mark.parametrize("which", ["commit", "record"])
def test_a_corrupt_block_that_is_read_fails_the_frame(
    name: str, body: dict[str, Any], which: str
) -> None:
    commit = cid_bytes(body["commit"]["$link"])
    records = _links(body) - {commit}
    if which == "record" and not records:
        pytest.skip("no record block in this commit")
    pick = (lambda c: c == commit) if which == "commit" else (lambda c: c in records)
    with pytest.raises(ProtocolError) as err:
        decode_frame(commit_frame(_flip_block(body, pick)))
    assert err.value.reason == "block_hash"


def _all_cids(body: dict[str, Any]) -> set[bytes]:
    return set(read_car(b64decode_loose(body["blocks"]["$bytes"])).blocks)


def test_lazy_car_checks_the_block_it_returns() -> None:
    body = commit_body()
    whole = read_car(b64decode_loose(body["blocks"]["$bytes"]))
    lazy = read_car_lazily(b64decode_loose(body["blocks"]["$bytes"]))
    assert lazy.root_cid == whole.root_cid and lazy.root == whole.root
    for cid, block in whole.blocks.items():
        assert lazy.block(cid) == block
    assert lazy.block(hashlib.sha256(b"absent").digest()) is None
    flipped = _flip_block(body, lambda c: True)
    lazy = read_car_lazily(b64decode_loose(flipped["blocks"]["$bytes"]))
    bad = next(iter(whole.blocks))  # the first block of the CAR: the one flipped
    with pytest.raises(ProtocolError) as err:
        lazy.block(bad)
    assert err.value.reason == "block_hash"


def test_a_commit_data_that_is_no_supported_cid_gives_no_data_cid() -> None:
    from firehose.protocol import frames
    from firehose.protocol.cid import cid_bytes_for, cid_str_from_bytes

    good = cid_bytes_for(b"root")
    assert frames._data_cid({"data": good}) == cid_str_from_bytes(good)
    # 36 bytes that are no CIDv1 with sha2-256 (libipld's parser refuses the first, the
    # second is a sha2-512 code with a 32-byte length): no repo head, and no error.
    for data in (bytes(36), b"\x01\x71\x13\x20" + bytes(32), good[:35], "text"):
        assert frames._data_cid({"data": data}) is None
