"""The devnet generator's frames, decoded independently with libipld.

Every property a consumer relies on is checked from the bytes: canonical DAG-CBOR, CAR
blocks matching their CIDs, signed commits whose `data` is the MST of the replayed state,
sync 1.1 chaining (since/prevData/prev) and a truth equal to the replayed final state.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from typing import Any

import libipld
import pytest

from firehose.devnet import dagcbor
from firehose.devnet.generator import Generator
from firehose.devnet.keys import parse_did_key, verify
from firehose.devnet.mst import build_mst
from firehose.devnet.tid import TID_ALPHABET, tid, tid_micros

SEED, ACCOUNTS, EVENTS = 7, 30, 4000
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")


def read_car(data: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Minimal CAR v1 reader (test-local): (roots, [(cid, block bytes)])."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                return value, pos
            shift += 7

    length, pos = varint(0)
    header = libipld.decode_dag_cbor(data[pos : pos + length])
    assert header["version"] == 1
    pos += length
    blocks = []
    while pos < len(data):
        length, pos = varint(pos)
        section = data[pos : pos + length]
        pos += length
        assert section[:4] in (b"\x01\x71\x12\x20", b"\x01\x55\x12\x20")
        blocks.append((section[:36], section[36:]))
    return header["roots"], blocks


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


@pytest.fixture(scope="module")
def generated() -> tuple[Generator, list[bytes]]:
    generator = Generator(seed=SEED, accounts=ACCOUNTS)
    return generator, generator.frames(EVENTS)


@pytest.fixture(scope="module")
def decoded(generated: tuple[Generator, list[bytes]]) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for frame in generated[1]:
        header, body = libipld.decode_dag_cbor_multi(frame)
        # canonical DAG-CBOR: libipld's re-encoding is byte-identical
        assert libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body) == frame
        out.append((header, body))
    return out


def test_tid_encoding() -> None:
    assert tid(0, 0) == "2222222222222"
    assert "".join(sorted(TID_ALPHABET)) == TID_ALPHABET
    micros = 1_735_689_600_123_456
    value = tid(micros, 17)
    assert TID_RE.match(value) and tid_micros(value) == micros
    assert tid(micros, 17) < tid(micros + 1, 0) < tid(micros + 1, 1)


def test_mst_node_encoder_matches_cbor2() -> None:
    rng = random.Random(3)
    for _ in range(200):
        entries = []
        raw = []
        for _ in range(rng.randint(0, 6)):
            prefix, suffix = rng.randint(0, 300), rng.randbytes(rng.randint(0, 300))
            value = dagcbor.cid_for_raw(rng.randbytes(4))
            subtree = None if rng.random() < 0.5 else dagcbor.cid_for_block(rng.randbytes(4))
            entries.append(dagcbor.encode_mst_entry(prefix, suffix, value, subtree))
            raw.append(
                {
                    "p": prefix,
                    "k": suffix,
                    "v": dagcbor.link(value),
                    "t": None if subtree is None else dagcbor.link(subtree),
                }
            )
        left = None if rng.random() < 0.5 else dagcbor.cid_for_block(b"x")
        expected = dagcbor.encode({"l": None if left is None else dagcbor.link(left), "e": raw})
        assert dagcbor.encode_mst_node(left, entries) == expected


def test_same_seed_same_bytes_other_seed_other_bytes(
    generated: tuple[Generator, list[bytes]],
) -> None:
    again = Generator(seed=SEED, accounts=ACCOUNTS).frames(EVENTS)
    assert again == generated[1]
    assert Generator(seed=SEED + 1, accounts=ACCOUNTS).frames(50) != generated[1][:50]


def test_frames_replay_to_signed_consistent_repos_and_truth(
    generated: tuple[Generator, list[bytes]], decoded: list[tuple[dict[str, Any], Any]]
) -> None:
    generator = generated[0]
    state: dict[str, dict[str, bytes]] = {}
    last: dict[str, tuple[str, bytes]] = {}  # did -> (rev, data)
    ever_deleted: dict[str, set[str]] = {}
    handles: dict[str, str] = {}
    statuses: dict[str, str] = {}
    keys: dict[str, Any] = {}
    seen: Counter[str] = Counter()
    for seq, (header, body) in enumerate(decoded, start=1):
        assert header["op"] == 1
        assert body["seq"] == seq
        assert TIME_RE.match(body["time"])
        kind = header["t"]
        seen[kind] += 1
        if kind == "#identity":
            handles[body["did"]] = body["handle"]
            account = generator.by_did[body["did"]]
            doc = account.did_document()
            keys[body["did"]] = parse_did_key(doc["verificationMethod"][0]["publicKeyMultibase"])[1]
            continue
        if kind == "#account":
            assert body["active"] == ("status" not in body)
            statuses[body["did"]] = "active" if body["active"] else body["status"]
            seen[f"status:{statuses[body['did']]}"] += 1
            continue
        assert kind == "#commit", kind
        did = body["repo"]
        assert statuses[did] == "active", "commits only from active accounts"
        assert body["rebase"] is False and body["tooBig"] is False and body["blobs"] == []
        roots, blocks = read_car(body["blocks"])
        assert roots == [body["commit"]]
        block_map = {}
        for cid, data in blocks:
            assert hashlib.sha256(data).digest() == cid[4:]
            block_map[cid] = data
        commit = libipld.decode_dag_cbor(block_map[body["commit"]])
        assert commit["did"] == did and commit["version"] == 3 and commit["prev"] is None
        assert commit["rev"] == body["rev"] and TID_RE.match(body["rev"])
        unsigned = {k: v for k, v in commit.items() if k != "sig"}
        assert verify(keys[did], libipld.encode_dag_cbor(unsigned), commit["sig"])
        records = state.setdefault(did, {})
        if did in last:
            assert body["since"] == last[did][0] and body["prevData"] == last[did][1]
            assert body["rev"] > last[did][0]
        else:
            assert body["since"] is None and "prevData" not in body
        for op in body["ops"]:
            path, action = op["path"], op["action"]
            collection, rkey = path.split("/")
            assert rkey == "self" or TID_RE.match(rkey)
            seen[f"{action}:{collection}"] += 1
            if action == "create":
                assert path not in records and "prev" not in op
                if path in ever_deleted.get(did, set()):
                    seen["recreate"] += 1
            else:
                assert op["prev"] == records[path]
            if action == "delete":
                assert op["cid"] is None
                del records[path]
                ever_deleted.setdefault(did, set()).add(path)
            else:
                records[path] = op["cid"]
                record = libipld.decode_dag_cbor(block_map[op["cid"]])
                assert record["$type"] == collection
                if has_nul(record):
                    seen["nul"] += 1
        if len(body["ops"]) > 1:
            seen["multi"] += 1
        root, _ = build_mst(records.items())
        assert commit["data"] == root  # data is the MST of exactly the replayed state
        assert root in block_map  # the new root node travels with the commit
        last[did] = (body["rev"], commit["data"])

    truth = generator.truth()
    assert truth["last_seq"] == EVENTS
    expected_records = {}
    expected_deleted = set()
    for did, records in state.items():
        if statuses[did] == "deleted":
            continue
        for path, cid in records.items():
            expected_records[f"at://{did}/{path}"] = dagcbor.cid_str(cid)
        for path in ever_deleted.get(did, set()) - records.keys():
            expected_deleted.add(f"at://{did}/{path}")
    assert truth["records"] == expected_records
    assert truth["deleted"] == sorted(expected_deleted)
    assert truth["handles"] == handles
    assert truth["statuses"] == statuses

    # realistic coverage: every collection, every action, lifecycle events
    for collection in (
        "app.bsky.feed.post",
        "app.bsky.feed.like",
        "app.bsky.feed.repost",
        "app.bsky.graph.follow",
        "app.bsky.graph.block",
        "app.bsky.actor.profile",
        "app.bsky.graph.list",
        "app.bsky.graph.listitem",
        "app.bsky.feed.generator",
        "app.bsky.graph.starterpack",
        "com.example.devnet.note",
    ):
        assert seen[f"create:{collection}"] > 0, collection
    assert seen["update:app.bsky.actor.profile"] > 0 and seen["update:com.example.devnet.note"]
    assert seen["delete:app.bsky.feed.post"] > 0
    assert seen["recreate"] > 0 and seen["multi"] > 0 and seen["nul"] > 0
    assert seen["#identity"] > ACCOUNTS  # sign-ups plus handle changes
    for status in ("active", "deactivated", "takendown", "suspended", "deleted"):
        assert seen[f"status:{status}"] > 0, status
    assert "deleted" in statuses.values()


def test_generation_speed() -> None:
    generator = Generator(seed=1, accounts=200)
    started = time.perf_counter()
    generator.frames(3000)
    rate = 3000 / (time.perf_counter() - started)
    print(f"devnet generation: {rate:.0f} events/s")
    assert rate > 500  # a loose floor: catches accidental quadratic behaviour only


def test_hand_written_encoders_match_cbor2() -> None:
    data = dagcbor.cid_for_block(b"tree")
    for sig in (None, bytes(64)):
        expected: dict[str, Any] = {
            "did": "did:plc:abc",
            "rev": "3lenax2ss2227",
            "data": dagcbor.link(data),
            "prev": None,
            "version": 3,
        }
        if sig is not None:
            expected["sig"] = sig
        got = dagcbor.encode_commit("did:plc:abc", "3lenax2ss2227", data, 3, sig)
        assert got == dagcbor.encode(expected)
    header = dagcbor.car_header([data])
    assert header[1:] == dagcbor.encode({"version": 1, "roots": [dagcbor.link(data)]})
