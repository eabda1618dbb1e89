"""The devnet's MST builders against the interop vectors and real repositories.

Real CARs are decoded with libipld (independent of our cbor2 encoder) and walked here, so a
match means our tree layout and node encoding agree byte for byte with other implementations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import libipld
import pytest

from firehose.devnet import dagcbor
from firehose.devnet.mst import Mst, build_mst, key_height

VECTORS = Path("/work/shared/atproto-vectors")
REPO_CARS = [
    VECTORS / "rsky/rsky-repo/resources/test/valid_repo.car",
    VECTORS / "arroba/arroba/tests/snarfed2.car",
    VECTORS / "indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car",
]
needs_vectors = pytest.mark.skipif(not VECTORS.exists(), reason="atproto-vectors not present")


def leaves(blocks: dict[bytes, Any], node_cid: bytes) -> list[tuple[str, bytes]]:
    """Walk an MST (decoded by libipld) in key order: [(key, record cid)]."""
    node = blocks[node_cid]
    out: list[tuple[str, bytes]] = []
    if node["l"] is not None:
        out += leaves(blocks, node["l"])
    previous = b""
    for entry in node["e"]:
        key = previous[: entry["p"]] + entry["k"]
        out.append((key.decode(), entry["v"]))
        previous = key
        if entry["t"] is not None:
            out += leaves(blocks, entry["t"])
    return out


@needs_vectors
def test_key_heights_match_interop_vectors() -> None:
    cases = json.loads((VECTORS / "interop-tests/mst/key_heights.json").read_text())
    for case in cases:
        assert key_height(case["key"].encode()) == case["height"], case


@needs_vectors
@pytest.mark.parametrize("path", REPO_CARS, ids=lambda p: p.name)
def test_rebuilt_root_equals_real_repo_commit_data(path: Path) -> None:
    header, blocks = libipld.decode_car(path.read_bytes())
    commit = blocks[header["roots"][0]]
    items = leaves(blocks, commit["data"])
    assert items == sorted(items)
    root, node_blocks = build_mst(items)
    assert root == commit["data"]
    for cid, block in node_blocks:  # every node we encode is byte-identical to theirs
        assert libipld.decode_dag_cbor(block) == blocks[cid]
    tree = Mst()
    for key, cid in reversed(items):  # insertion order must not matter
        tree.put(key, cid)
    assert tree.root_cid() == commit["data"]


@needs_vectors
def test_mst_test_suite_exhaustive_roots() -> None:
    cars = sorted((VECTORS / "mst-test-suite/cars/exhaustive").glob("*.car"))
    assert cars
    for path in cars:
        header, blocks = libipld.decode_car(path.read_bytes())
        root = header["roots"][0]
        items = leaves(blocks, root)
        assert build_mst(items)[0] == root, path.name
        tree = Mst()
        for key, cid in items:
            tree.put(key, cid)
        assert tree.root_cid() == root, path.name


def test_empty_tree_is_one_empty_node() -> None:
    root, blocks = build_mst([])
    assert blocks == [(root, dagcbor.encode({"l": None, "e": []}))]
    assert Mst().root_cid() == root


def test_incremental_updates_match_reference_builder() -> None:
    rng = random.Random(7)
    tree, state = Mst(), dict[str, bytes]()
    keys = [f"app.bsky.feed.like/{rng.getrandbits(40):013x}" for _ in range(200)]
    for step in range(2000):
        key = rng.choice(keys)
        if key in state and rng.random() < 0.5:
            tree.delete(key)
            del state[key]
        else:
            state[key] = dagcbor.cid_for_raw(step.to_bytes(4, "big"))
            tree.put(key, state[key])
        if step % 25 == 0:
            root, node_blocks = build_mst(state.items())
            assert tree.root_cid() == root
            assert sorted(tree.all_blocks()) == sorted(node_blocks)
    while state:  # deleting everything returns to the empty tree
        key = next(iter(state))
        tree.delete(key)
        del state[key]
    assert tree.root_cid() == build_mst([])[0]


def test_new_blocks_are_exactly_the_changed_nodes() -> None:
    tree = Mst()
    for i in range(100):
        tree.put(f"app.bsky.feed.post/{i:013d}", dagcbor.cid_for_raw(bytes([i])))
    before = {cid for cid, _ in tree.all_blocks()}
    tree.new_blocks()
    tree.put("app.bsky.feed.post/0000000000050", dagcbor.cid_for_raw(b"changed"))
    fresh = tree.new_blocks()
    after = {cid for cid, _ in tree.all_blocks()}
    assert {cid for cid, _ in fresh} == after - before
    assert 0 < len(fresh) <= 8
