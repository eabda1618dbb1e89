"""Merkle Search Tree walk (https://atproto.com/specs/repository#mst-structure).

A node is ``{l: link|null, e: [{p: int, k: bytes, v: link, t: link|null}]}``: ``l`` is the
subtree left of every entry, each entry's key is the previous entry's key truncated to
``p`` bytes plus the suffix ``k``, ``v`` is the record CID, and ``t`` the subtree between
this entry and the next. An in-order walk therefore yields keys ("collection/rkey") in
sorted order. The walk uses an explicit stack (no recursion on hostile depth) and checks
that keys strictly increase and that no node below the root is empty, which together stop
a hostile DAG that reuses a subtree from making the walk quadratic or exponential: the
work is linear in the number of blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from firehose.protocol.car import Car
from firehose.protocol.cbor import decode_block, decode_record
from firehose.protocol.cid import (
    CID_BYTES,
    SUPPORTED_PREFIXES,
    cid_bytes_from_str,
    cid_str_from_bytes,
)
from firehose.protocol.errors import ProtocolError
from firehose.protocol.syntax import (
    TID_ALPHABET,
    TID_CHARS,
    is_did,
    is_nsid,
    is_record_key,
    is_tid,
)

# atproto MST keys are "collection/rkey": NSID (317) + 1 + record key (512), rounded up.
MAX_KEY_BYTES = 1024
# A repo of N records has well under 2N nodes; the cap bounds work on hostile DAGs.
MAX_NODES = 20_000_000


def mst_key_height(key: bytes | str) -> int:
    """Layer of a key: leading zero bits of sha256(key), counted in 2-bit chunks (fanout 4)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    digest = hashlib.sha256(raw).digest()
    value = int.from_bytes(digest, "big")
    zero_bits = 256 - value.bit_length()
    return zero_bits // 2


def _link(value: Any, what: str, nullable: bool) -> bytes | None:
    if value is None and nullable:
        return None
    if type(value) is not bytes or len(value) != CID_BYTES or value[:4] not in SUPPORTED_PREFIXES:
        _not_a_link(what)
    return value


def _not_a_link(what: str) -> NoReturn:
    raise ProtocolError("body", f"MST {what} is not a CID link")


def walk_mst(
    root_cid: bytes | str,
    get_block: Callable[[bytes], bytes | None],
    *,
    max_nodes: int = MAX_NODES,
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, record cid)`` for every entry under MST root `root_cid`, in key order.

    `get_block` maps a binary CID to its (already verified) block, or None if absent,
    which raises ProtocolError(``missing_block``) when reached. Keys must strictly
    increase (reason ``body`` otherwise).
    """
    if isinstance(root_cid, str):
        root_cid = cid_bytes_from_str(root_cid)
    # Stack items: bytes = a subtree to expand; tuple = an entry (key, value cid) to yield.
    stack: list[bytes | tuple[str, bytes]] = [root_cid]
    # Keys are compared as str: they were decoded from strict UTF-8, whose byte order is
    # the code point order, so this is the spec's byte order without encoding each key again.
    last_key: str | None = None
    nodes = 0
    while stack:
        item = stack.pop()
        if type(item) is tuple:
            key = item[0]
            if last_key is not None and key <= last_key:
                raise ProtocolError("body", f"MST keys out of order at {key[:100]!r}")
            last_key = key
            yield item
            continue
        assert isinstance(item, bytes)
        nodes += 1
        if nodes > max_nodes:
            raise ProtocolError("too_large", f"MST has more than {max_nodes} nodes")
        block = get_block(item)
        if block is None:
            raise ProtocolError("missing_block", f"MST node {cid_str_from_bytes(item)} missing")
        pending = _node_items(block, below_root=nodes > 1)
        # Push in reverse so the leftmost item pops first.
        stack.extend(reversed(pending))


def _node_items(block: bytes, *, below_root: bool) -> list[bytes | tuple[str, bytes]]:
    """One MST node -> its subtree links (bytes) and entries ``(key, value cid)``, in key
    order. Raises ProtocolError for anything that is not a well-formed node."""
    node = decode_block(block)
    if type(node) is not dict or type(node.get("e")) is not list:
        raise ProtocolError("body", "MST node is not {l, e}")
    pending: list[bytes | tuple[str, bytes]] = []
    left = _link(node.get("l"), "l", True)
    if left is not None:
        pending.append(left)
    elif not node["e"] and below_root:
        # The spec allows a node with no entries and no left subtree only as the root
        # of an empty repo. Elsewhere such keyless subtrees are what a hostile DAG
        # reuses behind every entry to make the walk quadratic (a 200 KB CAR took 9 s)
        # without ever repeating a key; refused, every subtree yields a key, and a
        # reused one repeats a key and fails the order check at once.
        raise ProtocolError("body", "empty MST node below the root")
    prev = b""
    prefixes = SUPPORTED_PREFIXES
    for entry in node["e"]:
        if type(entry) is not dict:
            raise ProtocolError("body", "MST entry is not a map")
        prefix_len = entry.get("p")
        suffix = entry.get("k")
        if type(prefix_len) is not int or type(suffix) is not bytes:
            raise ProtocolError("body", "MST entry needs integer p and bytes k")
        if not 0 <= prefix_len <= len(prev):
            raise ProtocolError("body", "MST entry prefix longer than the previous key")
        key = prev[:prefix_len] + suffix
        if len(key) > MAX_KEY_BYTES:
            raise ProtocolError("too_large", "MST key too long")
        # The `_link` checks inline: this loop runs once per record of every repo.
        value = entry.get("v")
        if type(value) is not bytes or len(value) != CID_BYTES or value[:4] not in prefixes:
            _not_a_link("v")
        try:
            key_str = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("body", "MST key is not UTF-8") from None
        pending.append((key_str, value))
        right = entry.get("t")
        if right is not None:
            if type(right) is not bytes or len(right) != CID_BYTES or right[:4] not in prefixes:
                _not_a_link("t")
            pending.append(right)
        prev = key
    return pending


@dataclass(frozen=True, slots=True)
class MissingSubtree:
    """A subtree whose root node is absent from a partial export (``getRepo?since=``).

    Its keys, if any, lie strictly between `after` and `before`: the nearest keys of the
    walk on either side (None: no key on that side, e.g. the repo's first subtree). A
    partial walk cannot know more of what it held."""

    cid: bytes
    after: str | None
    before: str | None


def walk_mst_partial(
    root_cid: bytes | str,
    get_block: Callable[[bytes], bytes | None],
    *,
    max_nodes: int = MAX_NODES,
) -> Iterator[tuple[str, bytes] | MissingSubtree]:
    """`walk_mst` over a tree some of whose nodes may be absent: an absent node (the data
    root included) is yielded as a `MissingSubtree`, in key order among the entries,
    instead of raising. Every node present is decoded and checked exactly as in
    `walk_mst`, and keys still strictly increase across the whole walk."""
    if isinstance(root_cid, str):
        root_cid = cid_bytes_from_str(root_cid)
    # Stack items: (subtree cid, key before it, key after it), or an entry (key, value cid).
    stack: list[tuple[bytes, str | None, str | None] | tuple[str, bytes]] = [(root_cid, None, None)]
    last_key: str | None = None  # compared as str, as in walk_mst
    nodes = 0
    while stack:
        item = stack.pop()
        if len(item) == 2:
            key_str = item[0]
            assert isinstance(key_str, str)
            if last_key is not None and key_str <= last_key:
                raise ProtocolError("body", f"MST keys out of order at {key_str[:100]!r}")
            last_key = key_str
            yield item
            continue
        cid, after, before = item
        nodes += 1
        if nodes > max_nodes:
            raise ProtocolError("too_large", f"MST has more than {max_nodes} nodes")
        block = get_block(cid)
        if block is None:
            yield MissingSubtree(cid, after, before)
            continue
        pending = _node_items(block, below_root=nodes > 1)
        out: list[tuple[bytes, str | None, str | None] | tuple[str, bytes]] = []
        for i, entry in enumerate(pending):
            if type(entry) is tuple:
                out.append(entry)
                continue
            assert isinstance(entry, bytes)
            # A link sits between entries (the node's own keys), or at its ends, where the
            # bounds are the parent's.
            lo = pending[i - 1] if i > 0 else None
            hi = pending[i + 1] if i + 1 < len(pending) else None
            out.append(
                (
                    entry,
                    lo[0] if type(lo) is tuple else after,
                    hi[0] if type(hi) is tuple else before,
                )
            )
        stack.extend(reversed(out))


MST_FOUND = "found"
MST_ABSENT = "absent"
MST_UNKNOWN = "unknown"
MAX_MST_DEPTH = 256  # heights are leading zero bit pairs of a sha256: at most 128 layers


def mst_lookup(
    root_cid: bytes | str, key: str, get_block: Callable[[bytes], bytes | None]
) -> tuple[str, bytes | None]:
    """Search `key` from MST root `root_cid`, reading only the nodes on its path.

    -> (MST_FOUND, record cid) | (MST_ABSENT, None): the path is whole and the key is not
    on it, which proves absence (what ``com.atproto.sync.getRecord`` sends for a missing
    record) | (MST_UNKNOWN, None): a node of the path is absent (a partial export).
    Nodes are decoded and checked as in `walk_mst`; a node whose keys do not increase
    raises ProtocolError(``body``)."""
    if isinstance(root_cid, str):
        root_cid = cid_bytes_from_str(root_cid)
    target = key.encode("utf-8")
    link: bytes | None = root_cid
    for depth in range(MAX_MST_DEPTH):
        if link is None:
            return MST_ABSENT, None
        block = get_block(link)
        if block is None:
            return MST_UNKNOWN, None
        items = _node_items(block, below_root=depth > 0)
        link = None
        last: bytes | None = None
        for item in items:
            if type(item) is not tuple:
                assert isinstance(item, bytes)
                link = item  # the subtree right of the keys seen so far
                continue
            item_key = item[0].encode("utf-8")
            if last is not None and item_key <= last:
                raise ProtocolError("body", f"MST keys out of order at {item[0][:100]!r}")
            last = item_key
            if item_key == target:
                return MST_FOUND, item[1]
            if item_key > target:
                break  # the key, if anywhere, is in the subtree left of this entry
            link = None  # past this entry: only its own right subtree may hold the key
    raise ProtocolError("too_large", f"MST path deeper than {MAX_MST_DEPTH}")


# Repo v2 commits have no `rev` (it came with v3: https://atproto.com/specs/repository,
# "Commit Objects"); about six in ten of the repo CARs in public test data are v2, and a repo
# stays v2 until its account writes again. The reference reads them: packages/repo
# util.ts `ensureV3Commit` upgrades a loaded v2 commit to v3 with `rev: commit.rev ??
# TID.nextStr()`, a fresh TID of the reader's clock, which the PDS only uses as the `since` of
# the next commit it writes on top. An indexer must not take "now": the PDS may write a v3
# commit a moment after serving the v2 snapshot, and rows carrying the reader's later clock
# would then win the rev guard (DESIGN.md invariant 2) over that newer commit's rows. The
# lowest TID instead (timestamp 0, clock id 0): every v3 commit of the repo supersedes what
# was read from its v2 commit, in whatever order backfill and live stream arrive.
V2_COMMIT_REV = TID_ALPHABET[0] * TID_CHARS  # "2222222222222"


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """The signed commit at the root of a repo export. `rev` is V2_COMMIT_REV for a v2
    commit (`version` 2), which has none."""

    did: str
    version: int
    rev: str
    data_cid: str
    prev: str | None
    cid: str


def read_commit(car: Car) -> CommitInfo:
    """Decode the root commit object of a repo CAR (v2 or v3: a v2 commit gets the rev
    V2_COMMIT_REV, see there)."""
    block = car.blocks.get(car.root_cid)
    if block is None:
        raise ProtocolError("missing_block", "root commit block is not in the CAR")
    commit = decode_block(block)
    if type(commit) is not dict:
        raise ProtocolError("body", "commit object is not a map")
    did, version, rev = commit.get("did"), commit.get("version"), commit.get("rev")
    if type(did) is not str or not is_did(did):
        raise ProtocolError("body", "commit has no valid did")
    if type(version) is not int or version not in (2, 3):
        raise ProtocolError("unsupported", f"repo version {version!r}"[:60])
    if version == 2 and rev is None:
        # The reference's v2 schema (packages/repo types.ts legacyV2Commit) has an optional
        # rev: late v2 commits carry one, which is kept as it is.
        rev = V2_COMMIT_REV
    if type(rev) is not str:
        raise ProtocolError("body", "commit rev is not a string")
    if not is_tid(rev):
        # The repository spec: rev is a TID. Rows carry it and the rev guard compares it as
        # text (DESIGN.md invariant 2): a commit with rev "" or "zzzz..." would make its
        # snapshot lose to, or beat, every real commit of the repo for good.
        raise ProtocolError("body", "commit rev is not a TID")
    data = _link(commit.get("data"), "commit data", False)
    assert data is not None
    prev = _link(commit.get("prev"), "commit prev", True)
    return CommitInfo(
        did=did,
        version=version,
        rev=rev,
        data_cid=cid_str_from_bytes(data),
        prev=None if prev is None else cid_str_from_bytes(prev),
        cid=car.root,
    )


RepoRecord = tuple[str, str, str, dict[str, Any]]


def iter_repo_records(car: Car) -> tuple[CommitInfo, Iterator[RepoRecord]]:
    """A full repo CAR -> (commit, iterator of (collection, rkey, cid, record JSON form)).

    Keys that are not "collection/rkey" and records that fail to decode raise
    ProtocolError from the iterator; a missing record or MST block raises missing_block.
    """
    info = read_commit(car)
    blocks = car.blocks
    root = cid_bytes_from_str(info.data_cid)

    def records() -> Iterator[RepoRecord]:
        for key, cid in walk_mst(root, blocks.get):
            collection, _, rkey = key.partition("/")
            if not is_nsid(collection) or not is_record_key(rkey):
                raise ProtocolError("syntax", f"bad MST key {key[:100]!r}")
            block = blocks.get(cid)
            if block is None:
                raise ProtocolError("missing_block", f"record {key[:100]} missing")
            record, _sanitized = decode_record(block)
            yield collection, rkey, cid_str_from_bytes(cid), record

    return info, records()
