"""Merkle Search Tree (MST) of a repository: record path -> record CID.

Spec: https://atproto.com/specs/repository#mst-structure. A key's height is the number of
leading zero bits of sha256(key) divided by 2 (fanout ~4). A node at layer L holds, in key
order, the keys of height L in its range; the gaps between them (and before the first) point
to subtrees at layer L-1 holding the lower keys of that gap. The root sits at the largest
height; a subtree with no keys of its own but lower keys below is an "empty intermediate"
node (only an `l` link), which the spec allows everywhere except at the root. The structure
depends only on the key set, so any correct builder gives the same root CID.

Node encoding: ``{"l": link|null, "e": [{"p": shared prefix length with the previous key in
the node, "k": remaining key bytes, "v": record link, "t": right subtree link|null}]}``.

Two builders live here: `build_mst` (from scratch, straight from the definition; the
reference) and `Mst` (persistent, copy-on-write updates touching only the nodes on the path
of the changed key, so a commit re-encodes O(depth) nodes rather than the whole tree).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from functools import lru_cache

from firehose.devnet import dagcbor

HEIGHT_CACHE_ENTRIES = 1 << 20


@lru_cache(maxsize=HEIGHT_CACHE_ENTRIES)
def key_height(key: bytes) -> int:
    """Leading zero bits of sha256(key), counted in 2-bit chunks."""
    digest = hashlib.sha256(key).digest()
    zeros = 0
    for byte in digest:
        if byte == 0:
            zeros += 8
            continue
        zeros += 8 - byte.bit_length()
        break
    return zeros // 2


class Node:
    """One MST node. Treated as immutable once encoded; `cid`/`block` are filled lazily.

    `enc[i]` caches the encoded bytes of entry i; code that changes an entry's key prefix
    (its predecessor) or its right subtree sets it to None (`set_pointer` does the latter)."""

    __slots__ = ("block", "cid", "enc", "keys", "left", "rights", "vals")

    def __init__(
        self,
        left: Node | None,
        keys: list[bytes],
        vals: list[bytes],
        rights: list[Node | None],
        enc: list[bytes | None] | None = None,
    ) -> None:
        self.left = left
        self.keys = keys
        self.vals = vals
        self.rights = rights
        self.enc: list[bytes | None] = [None] * len(keys) if enc is None else enc
        self.cid: bytes | None = None
        self.block: bytes | None = None

    def copy(self) -> Node:
        return Node(
            self.left, self.keys.copy(), self.vals.copy(), self.rights.copy(), self.enc.copy()
        )

    def pointer(self, index: int) -> Node | None:
        """The subtree covering the gap before entry `index` (index == len: after the last)."""
        return self.left if index == 0 else self.rights[index - 1]

    def set_pointer(self, index: int, node: Node | None) -> None:
        if index == 0:
            self.left = node
        else:
            self.rights[index - 1] = node
            self.enc[index - 1] = None

    def forget_prefix(self, index: int) -> None:
        """Entry `index` got a new predecessor, so its shared-prefix length may change."""
        if index < len(self.enc):
            self.enc[index] = None

    def encode(self) -> bytes:
        """Encode (children first) and cache; returns this node's CID."""
        if self.cid is not None:
            return self.cid
        enc = self.enc
        for i, cached in enumerate(enc):
            if cached is not None:
                continue
            key = self.keys[i]
            previous = self.keys[i - 1] if i else b""
            # Shared prefix length in O(1) Python steps: the first differing byte is where
            # the XOR of the two (equal-length) prefixes has its highest set bit.
            limit = min(len(previous), len(key))
            diff = int.from_bytes(previous[:limit], "big") ^ int.from_bytes(key[:limit], "big")
            prefix = limit - (diff.bit_length() + 7) // 8
            right = self.rights[i]
            subtree = None if right is None else right.encode()
            enc[i] = dagcbor.encode_mst_entry(prefix, key[prefix:], self.vals[i], subtree)
        left = None if self.left is None else self.left.encode()
        self.block = dagcbor.encode_mst_node(left, enc)  # type: ignore[arg-type]
        self.cid = dagcbor.cid_for_block(self.block)
        return self.cid


def _normalise(node: Node) -> Node | None:
    """A node with neither entries nor a subtree is no node at all."""
    return None if not node.keys and node.left is None else node


def _split(node: Node | None, key: bytes) -> tuple[Node | None, Node | None]:
    """Split a subtree into the parts below and above `key` (which it does not contain)."""
    if node is None:
        return None, None
    index = bisect_left(node.keys, key)
    below, above = _split(node.pointer(index), key)
    low = Node(
        node.left, node.keys[:index], node.vals[:index], node.rights[:index], node.enc[:index]
    )
    low.set_pointer(index, below)
    high = Node(above, node.keys[index:], node.vals[index:], node.rights[index:], node.enc[index:])
    high.forget_prefix(0)
    return _normalise(low), _normalise(high)


def _merge(first: Node | None, second: Node | None) -> Node | None:
    """Join two adjacent subtrees of the same layer (all keys of `first` < those of `second`)."""
    if first is None:
        return second
    if second is None:
        return first
    middle = _merge(first.pointer(len(first.keys)), second.left)
    merged = Node(
        first.left,
        first.keys + second.keys,
        first.vals + second.vals,
        first.rights + second.rights,
        first.enc + second.enc,
    )
    merged.set_pointer(len(first.keys), middle)
    merged.forget_prefix(len(first.keys))
    return merged


def _own(node: Node) -> Node:
    """A node this update may change: a copy of an encoded (possibly shared) node, or the
    node itself when it was created by the current batch of writes and is not encoded yet
    (nothing else refers to it: copying it again would only cost time)."""
    return node.copy() if node.cid is not None else node


def _insert(node: Node | None, layer: int, key: bytes, height: int, val: bytes) -> Node:
    current = Node(None, [], [], []) if node is None else _own(node)
    index = bisect_left(current.keys, key)
    if height == layer:
        if index < len(current.keys) and current.keys[index] == key:
            current.vals[index] = val
            current.enc[index] = None
            return current
        below, above = _split(current.pointer(index), key)
        current.set_pointer(index, below)
        current.keys.insert(index, key)
        current.vals.insert(index, val)
        current.rights.insert(index, above)
        current.enc.insert(index, None)
        current.forget_prefix(index + 1)
    else:
        current.set_pointer(index, _insert(current.pointer(index), layer - 1, key, height, val))
    return current


def _delete(node: Node | None, layer: int, key: bytes, height: int) -> Node | None:
    if node is None:
        raise KeyError(key)
    current = _own(node)
    index = bisect_left(current.keys, key)
    if height == layer:
        if index >= len(current.keys) or current.keys[index] != key:
            raise KeyError(key)
        merged = _merge(current.pointer(index), current.rights[index])
        del current.keys[index], current.vals[index], current.rights[index], current.enc[index]
        current.set_pointer(index, merged)
        current.forget_prefix(index)
    else:
        current.set_pointer(index, _delete(current.pointer(index), layer - 1, key, height))
    return _normalise(current)


def _walk(node: Node | None) -> Iterator[Node]:
    if node is None:
        return
    yield node
    yield from _walk(node.left)
    for right in node.rights:
        yield from _walk(right)


class Mst:
    """A mutable handle on a persistent MST; `put`/`delete` copy only the touched path."""

    def __init__(self) -> None:
        self.root: Node | None = None
        self.layer = 0

    def put(self, key: str, cid: bytes) -> None:
        raw = key.encode()
        height = key_height(raw)
        if self.root is None:
            self.layer = height
        while height > self.layer:  # grow the tree upwards with empty intermediate nodes
            self.root = Node(self.root, [], [], [])
            self.layer += 1
        self.root = _insert(self.root, self.layer, raw, height, cid)

    def delete(self, key: str) -> None:
        raw = key.encode()
        self.root = _delete(self.root, self.layer, raw, key_height(raw))
        # The root must not be an empty node pointing at a subtree (repository spec).
        while self.root is not None and not self.root.keys:
            self.root = self.root.left
            self.layer -= 1
        if self.root is None:
            self.layer = 0

    def root_cid(self) -> bytes:
        """The root CID. Encoding marks nodes as seen: call `new_blocks` first when the
        blocks of this change are needed (`Repo.commit` does)."""
        return self._root_node().encode()

    def new_blocks(self) -> list[tuple[bytes, bytes]]:
        """Encode the tree and return the blocks of nodes encoded for the first time: the
        nodes created since the previous call (unchanged subtrees keep their cached CID)."""
        return [(node.cid, node.block) for node in self.new_nodes()]  # type: ignore[misc]

    def new_nodes(self) -> list[Node]:
        """`new_blocks`, as the node objects (`removed_nodes` needs their identity)."""
        fresh: list[Node] = []
        self._collect_unencoded(self._root_node(), fresh)
        for node in fresh:  # children come before parents, so each encode is one level
            node.encode()
        return fresh

    def path_blocks(self, key: str) -> list[tuple[bytes, bytes]]:
        """Blocks of the nodes from the root down to where `key` is, or would be: the
        inclusion proof of a created/updated key, the exclusion proof of a deleted one."""
        raw = key.encode()
        node: Node | None = self._root_node()
        node_blocks = []
        while node is not None:
            node.encode()
            node_blocks.append((node.cid, node.block))
            index = bisect_left(node.keys, raw)
            if index < len(node.keys) and node.keys[index] == raw:
                break
            node = node.pointer(index)
        return node_blocks  # type: ignore[return-value]

    def all_blocks(self) -> list[tuple[bytes, bytes]]:
        root = self._root_node()
        root.encode()
        return [(node.cid, node.block) for node in _walk(root)]  # type: ignore[misc]

    def _root_node(self) -> Node:
        if self.root is None:
            self.root = Node(None, [], [], [])  # an empty repo is a single empty node
        return self.root

    def _collect_unencoded(self, node: Node | None, out: list[Node]) -> None:
        # An encoded node's children are encoded too, so stop descending at the first one.
        if node is None or node.cid is not None:
            return
        self._collect_unencoded(node.left, out)
        for right in node.rights:
            self._collect_unencoded(right, out)
        out.append(node)


def removed_nodes(old_root: Node | None, new_root: Node | None, fresh: list[Node]) -> list[Node]:
    """Nodes of the tree rooted at `old_root` that the tree at `new_root` no longer holds.

    `fresh` are the new tree's nodes created since the old one was encoded (`new_nodes`).
    Updates copy only the nodes on a changed path and share every other subtree by
    identity, so the new tree is the fresh nodes plus whole old subtrees hanging from them
    (or the new root itself, after a delete that lifts a subtree): walking the old tree
    and stopping at those shared subtrees visits only the replaced nodes, not the tree."""
    fresh_ids = {id(node) for node in fresh}
    kept: set[int] = set()
    if new_root is not None and id(new_root) not in fresh_ids:
        kept.add(id(new_root))
    for node in fresh:
        if node.left is not None and id(node.left) not in fresh_ids:
            kept.add(id(node.left))
        for right in node.rights:
            if right is not None and id(right) not in fresh_ids:
                kept.add(id(right))
    removed: list[Node] = []
    stack = [] if old_root is None else [old_root]
    while stack:
        node = stack.pop()
        if id(node) in kept:
            continue
        removed.append(node)
        if node.left is not None:
            stack.append(node.left)
        stack.extend(right for right in node.rights if right is not None)
    return removed


def _build_tree(entries: list[tuple[bytes, bytes]]) -> tuple[Node, int]:
    """The tree of sorted, distinct ``(key bytes, cid)`` entries and its root layer."""
    heights = [key_height(key) for key, _ in entries]
    top = max(heights, default=0)

    def build(lo: int, hi: int, layer: int) -> Node | None:
        if lo >= hi:
            return None
        seps = [i for i in range(lo, hi) if heights[i] == layer]
        bounds = [lo, *seps, hi]
        node = Node(None, [], [], [])
        node.left = build(bounds[0], bounds[1], layer - 1)
        for n, sep in enumerate(seps):
            node.keys.append(entries[sep][0])
            node.vals.append(entries[sep][1])
            node.rights.append(build(sep + 1, bounds[n + 2], layer - 1))
            node.enc.append(None)
        return node

    return build(0, len(entries), top) or Node(None, [], [], []), top


def mst_from_items(items: Iterable[tuple[str, bytes]]) -> Mst:
    """An `Mst` holding `items` (path -> cid), built in one pass rather than key by key:
    the bulk path of pre-populated repos (a put costs O(depth) node copies each)."""
    entries = sorted((key.encode(), cid) for key, cid in items)
    mst = Mst()
    if entries:
        mst.root, mst.layer = _build_tree(entries)
    return mst


def build_mst(items: Iterable[tuple[str, bytes]]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Reference builder: the tree for a key -> cid map, built from scratch.

    Returns the root CID and every node block (root first). Used to check `Mst`."""
    root, _ = _build_tree(sorted((key.encode(), cid) for key, cid in items))
    root_cid = root.encode()
    return root_cid, [(node.cid, node.block) for node in _walk(root)]  # type: ignore[misc]
