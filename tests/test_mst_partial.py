"""The partial MST walk and the key lookup (firehose/protocol/mst.py), and the pure rules
of a window download (backfill/since.py), on trees built by the devnet's MST."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill.blocks import MemoryBlocks
from backfill.hosts import FetchError
from backfill.since import (
    FALLBACK_OLD_COMMIT,
    FALLBACK_RECORD,
    FALLBACK_SUBTREE,
    KIND_SINCE_PARTIAL,
    KIND_SINCE_WHOLE,
    PROFILE_KEY,
    PROFILE_SETTLED,
    PROFILE_UNKNOWN,
    Checked,
    SinceSuspect,
    check_partial,
)
from firehose.devnet import dagcbor
from firehose.devnet.mst import build_mst
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import (
    MST_ABSENT,
    MST_FOUND,
    MST_UNKNOWN,
    MissingSubtree,
    mst_lookup,
    walk_mst,
    walk_mst_partial,
)
from firehose.protocol.syntax import make_tid

SINCE = make_tid(1_700_000_000_000_000)


def tid(offset_s: float) -> str:
    """A TID `offset_s` seconds after SINCE's time (negative: before)."""
    return make_tid(1_700_000_000_000_000 + int(offset_s * 1_000_000), 3)


def tree(keys: list[str]) -> tuple[bytes, dict[bytes, bytes], dict[str, bytes]]:
    """(root cid, node blocks, key -> record cid) of an MST over `keys`."""
    records = {k: dagcbor.encode_block({"k": k})[0] for k in keys}
    root, nodes = build_mst(records.items())
    return root, dict(nodes), records


def test_partial_walk_equals_the_walk_on_a_whole_tree() -> None:
    keys = [f"app.bsky.feed.post/{tid(i)}" for i in range(300)]
    root, nodes, records = tree(keys)
    assert list(walk_mst_partial(root, nodes.get)) == list(walk_mst(root, nodes.get))
    assert [k for k, _ in walk_mst(root, nodes.get)] == sorted(records)
    for key in keys[::37]:
        assert mst_lookup(root, key, nodes.get) == (MST_FOUND, records[key])
    assert mst_lookup(root, "app.bsky.feed.post/zzz", nodes.get) == (MST_ABSENT, None)
    assert mst_lookup(root, "a", nodes.get) == (MST_ABSENT, None)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(5, 250), st.integers(0, 2**32), st.floats(0.05, 0.9))
def test_partial_walk_reports_every_absent_subtree_in_place(n: int, seed: int, drop: float) -> None:
    """Dropping nodes: the keys yielded are exactly those not under a dropped node, in
    order, and each `MissingSubtree`'s bounds enclose the keys it hid."""
    rng = random.Random(seed)
    keys = sorted(f"app.bsky.feed.like/{tid(rng.uniform(-1e6, 1e6))}" for _ in range(n))
    keys = sorted(set(keys))
    root, nodes, records = tree(keys)
    kept = {c: b for c, b in nodes.items() if c == root or rng.random() > drop}
    items = list(walk_mst_partial(root, kept.get))
    seen = [i for i in items if not isinstance(i, MissingSubtree)]
    assert [k for k, _ in seen] == sorted(k for k, _ in seen)
    assert all(records[k] == c for k, c in seen)
    # Keys not yielded lie inside some missing subtree's bounds.
    hidden = set(records) - {k for k, _ in seen}
    gaps = [i for i in items if isinstance(i, MissingSubtree)]
    for key in hidden:
        assert any(
            (g.after is None or g.after < key) and (g.before is None or key < g.before)
            for g in gaps
        ), key
    # The lookup agrees: a yielded key is found or its path is incomplete; a hidden key is
    # never "absent".
    for key, cid in seen[:40]:
        assert mst_lookup(root, key, kept.get) in ((MST_FOUND, cid), (MST_UNKNOWN, None))
    for key in sorted(hidden)[:40]:
        assert mst_lookup(root, key, kept.get)[0] == MST_UNKNOWN


def test_missing_root_is_one_missing_subtree() -> None:
    root, _nodes, _ = tree(["app.bsky.feed.post/" + tid(1)])
    nothing: dict[bytes, bytes] = {}
    assert list(walk_mst_partial(root, nothing.get)) == [MissingSubtree(root, None, None)]
    assert mst_lookup(root, "x/y", nothing.get) == (MST_UNKNOWN, None)


def test_lookup_refuses_a_node_with_keys_out_of_order() -> None:
    a, b = dagcbor.encode_block({"a": 1})[0], dagcbor.encode_block({"b": 2})[0]
    entries = [
        dagcbor.encode_mst_entry(0, b"b/2", a, None),
        dagcbor.encode_mst_entry(0, b"a/1", b, None),
    ]
    block = dagcbor.encode_mst_node(None, entries)
    cid = dagcbor.cid_for_block(block)
    with pytest.raises(ProtocolError):
        mst_lookup(cid, "c/3", {cid: block}.get)
    with pytest.raises(ProtocolError):
        list(walk_mst_partial(cid, {cid: block}.get))


# --- check_partial: the rules of backfill/since.py ----------------------------------------------


def spool_of(blocks: dict[bytes, bytes]) -> MemoryBlocks:
    spool = MemoryBlocks()
    for cid, block in blocks.items():
        spool.add(cid, block)
    return spool


def check(
    keys: list[str], present: set[str], drop_nodes: frozenset[bytes] = frozenset(), rev: str = ""
) -> Checked:
    """check_partial over an MST of `keys` where only `present` records have blocks."""
    root, nodes, records = tree(keys)
    blocks = {c: b for c, b in nodes.items() if c not in drop_nodes}
    for key in present:
        blocks[records[key]] = dagcbor.encode_block({"k": key})[1]
    return check_partial(
        spool_of(blocks), rev or tid(10_000), "bafy-commit", dagcbor.cid_str(root), SINCE, []
    )


def test_old_records_absent_is_a_partial_tree() -> None:
    old = [f"app.bsky.feed.post/{tid(-i - 1)}" for i in range(40)]
    new = [f"app.bsky.feed.post/{tid(i + 1)}" for i in range(5)]
    got = check([*old, *new, PROFILE_KEY], set(new))
    assert got.kind == KIND_SINCE_PARTIAL and got.records == 5
    assert got.absent_records == 41 and got.profile == PROFILE_UNKNOWN
    whole = check([*old, *new], {*old, *new})
    assert whole.kind == KIND_SINCE_WHOLE and whole.profile == PROFILE_SETTLED


def test_profile_settled_by_the_partial_tree() -> None:
    new = [f"app.bsky.feed.post/{tid(i + 1)}" for i in range(3)]
    old = [f"app.bsky.feed.post/{tid(-i - 1)}" for i in range(3)]
    # Present profile block: settled. All nodes present, no profile key: absence proven.
    assert check([*old, *new, PROFILE_KEY], {*new, PROFILE_KEY}).profile == PROFILE_SETTLED
    assert check([*old, *new], set(new)).profile == PROFILE_SETTLED


def test_record_of_the_window_absent_is_suspect() -> None:
    new = [f"app.bsky.feed.post/{tid(i + 1)}" for i in range(5)]
    with pytest.raises(SinceSuspect) as info:
        check(new, set(new[1:]))
    assert info.value.reason == FALLBACK_RECORD


def test_absent_blocks_under_a_commit_not_after_since_are_suspect() -> None:
    old = [f"app.bsky.feed.post/{tid(-i - 1)}" for i in range(5)]
    with pytest.raises(SinceSuspect) as info:
        check(old, set(old[1:]), rev=tid(-0.5))
    assert info.value.reason == FALLBACK_OLD_COMMIT


def inner_hole(root: bytes, nodes: dict[bytes, bytes]) -> bytes:
    """A non-root node that, once dropped, leaves a hole between two keys."""
    for cid in nodes:
        if cid == root:
            continue
        items = walk_mst_partial(root, {c: b for c, b in nodes.items() if c != cid}.get)
        (hole,) = [i for i in items if isinstance(i, MissingSubtree)]
        if hole.after and hole.before:
            return cid
    raise AssertionError("no inner subtree")


def test_subtree_between_two_window_keys_absent_is_suspect() -> None:
    new = [f"app.bsky.feed.post/{tid(i + 1)}" for i in range(400)]
    root, nodes, _ = tree(new)
    with pytest.raises(SinceSuspect) as info:
        check(new, set(new), drop_nodes=frozenset({inner_hole(root, nodes)}))
    assert info.value.reason == FALLBACK_SUBTREE
    # The same hole among OLD keys is just older than the window.
    old = [f"app.bsky.feed.post/{tid(-i - 1)}" for i in range(400)]
    root, nodes, _ = tree(old)
    got = check(old, set(old), drop_nodes=frozenset({inner_hole(root, nodes)}))
    assert got.kind == KIND_SINCE_PARTIAL and got.absent_subtrees == 1
    # A hole whose bounds are in two collections proves nothing: partial, not suspect.
    mixed = [*new[:200], *(f"app.bsky.feed.repost/{tid(i + 1)}" for i in range(200))]
    root, nodes, _ = tree(mixed)
    checked = 0
    for cid in nodes:
        items = walk_mst_partial(root, {c: b for c, b in nodes.items() if c != cid}.get)
        (hole,) = [i for i in items if isinstance(i, MissingSubtree)]
        if hole.after and hole.before and hole.after.split("/")[0] != hole.before.split("/")[0]:
            got = check(mixed, set(mixed), drop_nodes=frozenset({cid}))
            assert got.kind == KIND_SINCE_PARTIAL
            checked += 1
    assert checked, "the tree should have a subtree between the two collections"


def test_bad_node_is_a_bad_response() -> None:
    block = dagcbor.encode({"e": "not a list"})
    cid = dagcbor.cid_for_block(block)
    with pytest.raises(FetchError) as info:
        check_partial(spool_of({cid: block}), tid(5), "c", dagcbor.cid_str(cid), SINCE, None)
    assert (info.value.reason, info.value.transient) == ("bad_response", False)
