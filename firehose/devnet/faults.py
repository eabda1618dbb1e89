"""Malformed frames the relay can inject (`malformed_every`), to exercise the worker's
error paths. None of them touches the truth: they never carry a new seq, and the ones that
look like commits belong to a fake account that is not part of the event log.

Kinds, in rotation order:

* ``random_bytes``   - 0xff (a CBOR "break" code, invalid as the first byte) + 31 random
  bytes: not decodable at all.
* ``truncated_cbor`` - a valid fake #commit frame cut in the middle of its body.
* ``unknown_op``     - header ``{"op": 7, "t": "#commit"}`` (op is 1 or -1 in the event
  stream spec) followed by a valid fake #commit body.
* ``bad_block_hash`` - a fake #commit whose CAR holds the record block with one byte changed,
  so sha256(bytes) no longer matches the block's CID.
* ``missing_block``  - a fake #commit whose op points at a record CID with no block in the CAR
  (the CAR itself is well formed; per docs/ARCHITECTURE.md such an op is an invalid op).

Fake commits reuse the seq of the last real frame sent on the connection, so even a consumer
that accepted one would not move its cursor past any real event.

`GarbageFrames` (`garbage_every`) sends messages that are no frame at all, and `cut_frame`
builds the bytes of a frame cut in the middle (`cut_every`); see relay.py.
"""

from __future__ import annotations

import random

from firehose.devnet import dagcbor, frames
from firehose.devnet.keys import SigningKey
from firehose.devnet.repo import ACTION_CREATE, Repo, Write
from firehose.devnet.tid import tid

FAKE_DID = "did:plc:malformedframeaaaaaaaaaa"  # 24 base32 chars, never in the truth
FAKE_TIME_US = 1_735_689_600_000_000
KINDS = ("random_bytes", "truncated_cbor", "unknown_op", "bad_block_hash", "missing_block")
_MARKER = b"devnet-malformed-A"


class MalformedFrames:
    """Builds the malformed frames of one relay, deterministically from `seed`."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"malformed|{seed}")
        repo = Repo(FAKE_DID, SigningKey.from_seed(seed, 1_000_000))
        record = {
            "$type": "app.bsky.feed.post",
            "text": _MARKER.decode(),
            "createdAt": frames.rfc3339_millis(FAKE_TIME_US),
        }
        path = f"app.bsky.feed.post/{tid(FAKE_TIME_US, 1)}"
        self.commit = repo.commit([Write(ACTION_CREATE, path, record)], tid(FAKE_TIME_US, 0))
        assert repo.commit_cid is not None and repo.commit_block is not None
        record_cid, record_block = repo.records[path]
        head = [(repo.commit_cid, repo.commit_block), *repo.mst.all_blocks()]
        self.bad_hash_car = dagcbor.write_car(
            repo.commit_cid,
            [*head, (record_cid, record_block.replace(_MARKER, b"X" + _MARKER[1:]))],
        )
        self.missing_block_car = dagcbor.write_car(repo.commit_cid, head)
        self.count = 0

    def next_frame(self, seq: int) -> tuple[str, bytes]:
        """The next malformed frame (kinds rotate) and its kind."""
        kind = KINDS[self.count % len(KINDS)]
        self.count += 1
        body = frames.commit_body(seq, self.commit, frames.rfc3339_millis(FAKE_TIME_US))
        if kind == "random_bytes":
            return kind, b"\xff" + self.rng.getrandbits(31 * 8).to_bytes(31, "big")
        if kind == "truncated_cbor":
            frame = frames.header("#commit") + dagcbor.encode_ordered(body)
            return kind, frame[: len(frame) // 2]
        if kind == "unknown_op":
            return kind, dagcbor.encode({"op": 7, "t": "#commit"}) + dagcbor.encode(body)
        body["blocks"] = self.bad_hash_car if kind == "bad_block_hash" else self.missing_block_car
        return kind, frames.header("#commit") + dagcbor.encode(body)


# ---- connection-level faults (relay.py): garbage frames and mid-frame cuts ---------------------

GARBAGE_KINDS = ("noise", "empty", "text", "cbor_not_frame", "header_only")
GARBAGE_MAX_BYTES = 2048


class GarbageFrames:
    """Websocket messages that are no subscribeRepos frame at all (`garbage_every`), in
    rotation: binary noise of random length, an empty binary message, a text message (the
    protocol only sends binary), a valid DAG-CBOR value that is not a frame header, and a
    frame header with no body. Like MalformedFrames they carry no seq and change no truth."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"garbage|{seed}")
        self.count = 0

    def next_frame(self) -> tuple[str, bytes | str]:
        kind = GARBAGE_KINDS[self.count % len(GARBAGE_KINDS)]
        self.count += 1
        if kind == "noise":
            size = self.rng.randint(1, GARBAGE_MAX_BYTES)
            return kind, self.rng.getrandbits(size * 8).to_bytes(size, "big")
        if kind == "empty":
            return kind, b""
        if kind == "text":
            return kind, '{"op": 1, "t": "#commit", "seq": "not cbor"}'
        if kind == "cbor_not_frame":
            return kind, dagcbor.encode([1, "two", {"three": 3}])
        return kind, frames.header("#commit")


def websocket_frame_head(payload_bytes: int) -> bytes:
    """RFC 6455 section 5.2 header of one unmasked (server to client), final, binary frame."""
    if payload_bytes < 126:
        return bytes((0x82, payload_bytes))
    if payload_bytes < 1 << 16:
        return bytes((0x82, 126)) + payload_bytes.to_bytes(2, "big")
    return bytes((0x82, 127)) + payload_bytes.to_bytes(8, "big")


def cut_frame(frame: bytes) -> bytes:
    """The wire bytes of `frame` as one websocket message, cut in the middle of its payload:
    what a relay dying mid-send leaves on the socket."""
    return websocket_frame_head(len(frame)) + frame[: max(1, len(frame) // 2)]
