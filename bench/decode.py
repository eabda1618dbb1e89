"""Decode-only throughput of `decode_frame` for a typical one-post `#commit` frame.

The frame is encoded independently with cbor2 (not the decoder's libipld): a signed-commit
shaped block, 3 MST-node shaped blocks and one post record (~1.5 KB in all), as a relay
sends for a new post. Prints a human line and a JSON line:

    {"bench": "decode", "frames_per_s": ..., "us_per_frame": ..., "frame_bytes": ...}
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MachineLoad, claim, load_at_start  # noqa: E402
from firehose.protocol.frames import decode_frame  # noqa: E402

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
REV = "3lmxjzlexp22k"


def _cid(block: bytes) -> bytes:
    return b"\x01\x71\x12\x20" + hashlib.sha256(block).digest()


def _link(cid: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(42, b"\x00" + cid)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def build_frame() -> bytes:
    post = cbor2.dumps(
        {
            "text": "Just setting up my firehose indexer, it decodes frames fast. #atproto",
            "$type": "app.bsky.feed.post",
            "langs": ["en"],
            "createdAt": "2025-03-01T12:34:56.789Z",
        },
        canonical=True,
    )
    post_cid = _cid(post)
    nodes: list[bytes] = []
    child: bytes | None = None
    for level in range(3):
        entries = [
            {
                "k": f"app.bsky.feed.post/3lmxjz{level}exp2{i}k".encode(),
                "p": 0 if i == 0 else 18,
                "t": None if child is None or i else _link(child),
                "v": _link(post_cid if level == 0 and i == 0 else _cid(bytes([level, i]))),
            }
            for i in range(4)
        ]
        node = cbor2.dumps({"e": entries, "l": None}, canonical=True)
        nodes.append(node)
        child = _cid(node)
    assert child is not None
    commit = cbor2.dumps(
        {
            "did": DID,
            "rev": REV,
            "sig": hashlib.sha512(b"sig").digest(),
            "data": _link(child),
            "prev": None,
            "version": 3,
        },
        canonical=True,
    )
    commit_cid = _cid(commit)
    header = cbor2.dumps({"roots": [_link(commit_cid)], "version": 1}, canonical=True)
    car = _varint(len(header)) + header
    for block in [commit, *nodes, post]:
        section = _cid(block) + block
        car += _varint(len(section)) + section
    body = {
        "ops": [
            {"cid": _link(post_cid), "path": "app.bsky.feed.post/3lmxjzlexp22k", "action": "create"}
        ],
        "rev": REV,
        "seq": 8_123_456_789,
        "repo": DID,
        "time": "2025-03-01T12:34:56.999Z",
        "blobs": [],
        "since": "3lmxjza3h2i27",
        "blocks": car,
        "commit": _link(commit_cid),
        "rebase": False,
        "tooBig": False,
        "prevData": _link(child),
    }
    return cbor2.dumps({"t": "#commit", "op": 1}, canonical=True) + cbor2.dumps(
        body, canonical=True
    )


def main() -> None:
    load_at_start()
    data = build_frame()
    event = decode_frame(data)
    assert len(event.writes) == 1 and event.writes[0].record is not None  # type: ignore[union-attr]
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    for _ in range(2000):  # warm up
        decode_frame(data)
    frames = 0
    load = MachineLoad()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            decode_frame(data)
        frames += 1000
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    load.stop(cpu)
    rate = frames / elapsed
    print(load.describe())
    print(
        claim(
            load,
            f"decode_frame: {len(data)} B one-post commit, "
            f"{rate:,.0f} frames/s, {1e6 / rate:.1f} us/frame",
        )
    )
    print(f"CPU µs per frame: {cpu / frames * 1e6:.1f}")
    print(
        json.dumps(
            {
                "bench": "decode",
                "frames_per_s": round(rate),
                "us_per_frame": round(1e6 / rate, 2),
                "frame_bytes": len(data),
                "cpu_us_per_frame": round(cpu / frames * 1e6, 2),
                **load.fields(),
            }
        )
    )


if __name__ == "__main__":
    main()
