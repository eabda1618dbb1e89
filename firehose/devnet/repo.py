"""One account's repository: records, MST, signed commits and the CAR slices of the firehose.

Repository spec (https://atproto.com/specs/repository): a v3 commit is
``{did, version: 3, data: <MST root link>, rev: <TID>, prev: null, sig: <bytes>}``, signed
over the DAG-CBOR of the same map without `sig`. The firehose carries, per commit, a CAR v1
whose root is the commit and which holds the commit block, the MST nodes that changed and the
blocks of created/updated records (subscribeRepos lexicon, `#commit.blocks`), plus the
nodes on each op's path so the ops can be verified against the new tree. Sync 1.1
(https://github.com/bluesky-social/proposals/tree/main/0006-sync-iteration) adds `prevData`
(the previous MST root) and `prev` on update/delete ops so consumers can check continuity.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from firehose.devnet import dagcbor
from firehose.devnet.keys import SigningKey
from firehose.devnet.mst import Mst, mst_from_items, removed_nodes

ACTION_CREATE = "create"
ACTION_UPDATE = "update"
ACTION_DELETE = "delete"
REPO_VERSION = 3


@dataclass(frozen=True, slots=True)
class Write:
    """One requested change: `record` is the record value for create/update, None for delete.

    `block`, when given, is the record's DAG-CBOR already encoded (the history model writes
    values with keys in canonical order, `dagcbor.encode_ordered`, much faster than
    canonical sorting); None encodes `record` canonically."""

    action: str
    path: str  # "collection/rkey"
    record: dict[str, Any] | None = None
    block: bytes | None = None


@dataclass(frozen=True, slots=True)
class AppliedOp:
    action: str
    path: str
    cid: bytes | None  # new record CID (None for delete)
    prev: bytes | None  # previous record CID (None for create)


@dataclass(frozen=True, slots=True)
class Commit:
    """What one commit produced, ready to be framed as a `#commit` event."""

    did: str
    rev: str
    since: str | None
    commit_cid: bytes
    prev_data: bytes | None
    data: bytes
    car: bytes
    ops: tuple[AppliedOp, ...]


class Repo:
    """Current state of one account's repo (latest commit only; history is not kept).

    Besides the records and the MST it keeps what the reference PDS's block store keeps:
    every block of the current repo with the rev of the commit that FIRST wrote it
    (`block_revs`; atproto packages/pds actor-store repo_block.repoRev, inserted with ON
    CONFLICT DO NOTHING, and deleted when a commit drops the block), which is what
    com.atproto.sync.getRepo?since= filters on (`blocks_since`)."""

    def __init__(self, did: str, key: SigningKey) -> None:
        self.did = did
        self.key = key
        self.records: dict[str, tuple[bytes, bytes]] = {}  # path -> (cid, block)
        self.mst = Mst()
        self.rev: str | None = None
        self.data: bytes | None = None
        self.commit_cid: bytes | None = None
        self.commit_block: bytes | None = None
        self.block_revs: dict[bytes, str] = {}  # cid of every current block -> first rev
        self.collections: Counter[str] = Counter()  # records per collection
        self._record_refs: Counter[bytes] = Counter()  # paths per record cid
        self._served: tuple[str | None, list[tuple[str, bytes, bytes]]] | None = None
        self._served_car: tuple[str | None, bytes] | None = None

    def record_cid(self, path: str) -> bytes | None:
        entry = self.records.get(path)
        return None if entry is None else entry[0]

    def _apply(
        self, writes: list[Write], rev: str
    ) -> tuple[list[AppliedOp], dict[bytes, bytes], list[tuple[bytes, bytes]]]:
        """Apply `writes` to the records and the MST and record the blocks' first revs;
        returns the ops, the new record blocks and the new MST node blocks."""
        if self.rev is not None and rev <= self.rev:
            raise ValueError(f"rev must increase: {rev} <= {self.rev}")
        paths = [write.path for write in writes]
        if len(set(paths)) != len(paths):
            raise ValueError("a commit may touch each path at most once")
        old_root = self.mst.root
        ops: list[AppliedOp] = []
        record_blocks: dict[bytes, bytes] = {}
        gone: list[bytes] = []  # record cids a path stopped pointing at
        for write in writes:
            prev = self.record_cid(write.path)
            collection = write.path.split("/", 1)[0]
            if write.action == ACTION_DELETE:
                if prev is None:
                    raise KeyError(f"delete of a missing record: {write.path}")
                del self.records[write.path]
                self.mst.delete(write.path)
                self.collections[collection] -= 1
                if not self.collections[collection]:
                    del self.collections[collection]
                gone.append(prev)
                ops.append(AppliedOp(ACTION_DELETE, write.path, None, prev))
                continue
            if (write.action == ACTION_CREATE) != (prev is None) or write.record is None:
                raise ValueError(f"bad {write.action} of {write.path}")
            if write.block is not None:
                block = write.block
                cid = dagcbor.cid_for_block(block)
            else:
                cid, block = dagcbor.encode_block(write.record)
            self.records[write.path] = (cid, block)
            self.mst.put(write.path, cid)
            self._record_refs[cid] += 1
            if prev is None:
                self.collections[collection] += 1
            else:
                gone.append(prev)
            record_blocks[cid] = block
            ops.append(AppliedOp(write.action, write.path, cid, prev))

        fresh = self.mst.new_nodes()  # before root_cid(): it would mark them as seen
        node_blocks: list[tuple[bytes, bytes]] = [(n.cid, n.block) for n in fresh]  # type: ignore[misc]
        revs = self.block_revs
        # The reference store inserts the commit's new blocks (keeping the rev of a block
        # it already holds), then deletes the blocks the commit dropped: replaced MST
        # nodes, records no path points at any more, the previous commit.
        new_cids = {cid for cid, _ in node_blocks}
        for node in removed_nodes(old_root, self.mst.root, fresh):
            if node.cid not in new_cids:
                revs.pop(node.cid, None)  # type: ignore[arg-type]
        for cid in gone:
            self._record_refs[cid] -= 1
            if self._record_refs[cid] <= 0:
                del self._record_refs[cid]
                if cid not in record_blocks:
                    revs.pop(cid, None)
        if self.commit_cid is not None:
            revs.pop(self.commit_cid, None)
        for cid in new_cids:
            revs.setdefault(cid, rev)
        for cid in record_blocks:
            revs.setdefault(cid, rev)
        return ops, record_blocks, node_blocks

    def commit(self, writes: list[Write], rev: str) -> Commit:
        """Apply `writes` atomically as one signed commit at `rev` (must exceed the last rev)."""
        ops, record_blocks, node_blocks = self._apply(writes, rev)
        data = self.mst.root_cid()
        unsigned = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, None)
        signature = self.key.sign(unsigned)
        commit_block = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, signature)
        commit_cid = dagcbor.cid_for_block(commit_block)

        blocks: dict[bytes, bytes] = {commit_cid: commit_block}
        for cid, block in node_blocks:
            blocks.setdefault(cid, block)
        # Sync 1.1: consumers may check each op against the new tree (and invert it), so
        # the proof path of every op travels too, even where those nodes are not new (e.g.
        # after a delete the root can be an old subtree).
        for op in ops:
            for cid, block in self.mst.path_blocks(op.path):
                blocks.setdefault(cid, block)
        for cid, block in record_blocks.items():
            blocks.setdefault(cid, block)
        car = dagcbor.write_car(commit_cid, blocks.items())

        result = Commit(
            did=self.did,
            rev=rev,
            since=self.rev,
            commit_cid=commit_cid,
            prev_data=self.data,
            data=data,
            car=car,
            ops=tuple(ops),
        )
        self.rev, self.data = rev, data
        self.commit_cid, self.commit_block = commit_cid, commit_block
        self.block_revs.setdefault(commit_cid, rev)
        return result

    def advance(self, writes: list[Write], rev: str) -> None:
        """Apply `writes` as a commit at `rev` that nobody will ever see (the history model
        builds years of commits before the devnet starts): its blocks and their first rev
        are what counts, so it is neither signed nor encoded. `seal` signs the last one."""
        self._apply(writes, rev)
        self.rev, self.data = rev, self.mst.root_cid()
        self.commit_cid = self.commit_block = None

    def seal(self) -> None:
        """Sign the current state as the commit at the current rev (after `advance`)."""
        if self.rev is None or self.data is None:
            raise ValueError(f"{self.did} has no rev to seal")
        unsigned = dagcbor.encode_commit(self.did, self.rev, self.data, REPO_VERSION, None)
        signature = self.key.sign(unsigned)
        block = dagcbor.encode_commit(self.did, self.rev, self.data, REPO_VERSION, signature)
        self.commit_block, self.commit_cid = block, dagcbor.cid_for_block(block)
        self.block_revs.setdefault(self.commit_cid, self.rev)

    def load(self, records: list[tuple[str, bytes, bytes]], rev: str) -> None:
        """Fill an empty repo with ``(path, cid, block)`` records as ONE signed commit.

        The bulk path of pre-populated accounts: the repo looks like one whose history
        happened before the relay started, so no firehose event describes these records
        and only com.atproto.sync.getRepo serves them. Every block's first rev is `rev`."""
        if self.rev is not None:
            raise ValueError(f"{self.did} already has commits")
        self.records = {path: (cid, block) for path, cid, block in records}
        if len(self.records) != len(records):
            raise ValueError("duplicate record path")
        self.collections = Counter(path.split("/", 1)[0] for path, _, _ in records)
        self._record_refs = Counter(cid for _, cid, _ in records)
        self.mst = mst_from_items((path, cid) for path, cid, _ in records)
        data = self.mst.root_cid()
        unsigned = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, None)
        signature = self.key.sign(unsigned)
        self.commit_block = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, signature)
        self.commit_cid = dagcbor.cid_for_block(self.commit_block)
        self.rev, self.data = rev, data
        self.block_revs = dict.fromkeys((cid for cid, _ in self.car_blocks()), rev)

    def car_blocks(self) -> list[tuple[bytes, bytes]]:
        """Every block of the current repo, commit first, each once. A snapshot (bytes are
        immutable), so it can be streamed while the generator keeps committing."""
        if self.commit_cid is None or self.commit_block is None:
            raise ValueError(f"{self.did} has no commit yet")
        blocks: dict[bytes, bytes] = {self.commit_cid: self.commit_block}
        for cid, block in self.mst.all_blocks():
            blocks.setdefault(cid, block)
        for cid, block in self.records.values():
            blocks.setdefault(cid, block)
        return list(blocks.items())

    def served_blocks(self) -> list[tuple[str, bytes, bytes]]:
        """``(first rev, cid, block)`` of every current block in the order the reference
        PDS streams getRepo: ``ORDER BY repoRev DESC, cid DESC`` (SqlRepoReader.
        getBlockRange; cid as its base32 string). Cached per rev; treat as immutable."""
        cached = self._served
        if cached is not None and cached[0] == self.rev:
            return cached[1]
        revs = self.block_revs
        rows = [(revs[cid], dagcbor.cid_str(cid), cid, block) for cid, block in self.car_blocks()]
        rows.sort(reverse=True)
        served = [(rev, cid, block) for rev, _, cid, block in rows]
        self._served = (self.rev, served)
        return served

    def blocks_since(self, since: str | None) -> list[tuple[bytes, bytes]]:
        """The blocks getRepo?since= returns: first written by a commit whose rev is greater
        than `since` (the reference's ``repoRev > since``, a string comparison of TIDs), in
        the reference order; every block without `since`."""
        blocks = []
        for rev, cid, block in self.served_blocks():
            if since is not None and rev <= since:
                break  # rev-descending order: everything after is older too
            blocks.append((cid, block))
        return blocks

    def full_car(self) -> bytes:
        """The whole repo as com.atproto.sync.getRepo sends it (reference block order),
        cached per rev like `served_blocks`: written section by section it was about half of
        the devnet's CPU in bench/backfill.py, inside the clock; prebuilt accounts write it
        when they are built. Treat as immutable."""
        cached = self._served_car
        if cached is not None and cached[0] == self.rev:
            return cached[1]
        assert self.commit_cid is not None
        car = dagcbor.write_car(self.commit_cid, self.blocks_since(None))
        self._served_car = (self.rev, car)
        return car
