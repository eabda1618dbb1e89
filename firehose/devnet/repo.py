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

from dataclasses import dataclass
from typing import Any

from firehose.devnet import dagcbor
from firehose.devnet.keys import SigningKey
from firehose.devnet.mst import Mst, mst_from_items

ACTION_CREATE = "create"
ACTION_UPDATE = "update"
ACTION_DELETE = "delete"
REPO_VERSION = 3


@dataclass(frozen=True, slots=True)
class Write:
    """One requested change: `record` is the record value for create/update, None for delete."""

    action: str
    path: str  # "collection/rkey"
    record: dict[str, Any] | None = None


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
    """Current state of one account's repo (latest commit only; history is not kept)."""

    def __init__(self, did: str, key: SigningKey) -> None:
        self.did = did
        self.key = key
        self.records: dict[str, tuple[bytes, bytes]] = {}  # path -> (cid, block)
        self.mst = Mst()
        self.rev: str | None = None
        self.data: bytes | None = None
        self.commit_cid: bytes | None = None
        self.commit_block: bytes | None = None

    def record_cid(self, path: str) -> bytes | None:
        entry = self.records.get(path)
        return None if entry is None else entry[0]

    def commit(self, writes: list[Write], rev: str) -> Commit:
        """Apply `writes` atomically as one signed commit at `rev` (must exceed the last rev)."""
        if self.rev is not None and rev <= self.rev:
            raise ValueError(f"rev must increase: {rev} <= {self.rev}")
        paths = [write.path for write in writes]
        if len(set(paths)) != len(paths):
            raise ValueError("a commit may touch each path at most once")
        ops: list[AppliedOp] = []
        record_blocks: dict[bytes, bytes] = {}
        for write in writes:
            prev = self.record_cid(write.path)
            if write.action == ACTION_DELETE:
                if prev is None:
                    raise KeyError(f"delete of a missing record: {write.path}")
                del self.records[write.path]
                self.mst.delete(write.path)
                ops.append(AppliedOp(ACTION_DELETE, write.path, None, prev))
                continue
            if (write.action == ACTION_CREATE) != (prev is None) or write.record is None:
                raise ValueError(f"bad {write.action} of {write.path}")
            cid, block = dagcbor.encode_block(write.record)
            self.records[write.path] = (cid, block)
            self.mst.put(write.path, cid)
            record_blocks[cid] = block
            ops.append(AppliedOp(write.action, write.path, cid, prev))

        node_blocks = self.mst.new_blocks()  # before root_cid(): it would mark them as seen
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
        return result

    def load(self, records: list[tuple[str, bytes, bytes]], rev: str) -> None:
        """Fill an empty repo with ``(path, cid, block)`` records as ONE signed commit.

        The bulk path of pre-populated accounts: the repo looks like one whose history
        happened before the relay started, so no firehose event describes these records
        and only com.atproto.sync.getRepo serves them."""
        if self.rev is not None:
            raise ValueError(f"{self.did} already has commits")
        self.records = {path: (cid, block) for path, cid, block in records}
        if len(self.records) != len(records):
            raise ValueError("duplicate record path")
        self.mst = mst_from_items((path, cid) for path, cid, _ in records)
        data = self.mst.root_cid()
        unsigned = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, None)
        signature = self.key.sign(unsigned)
        self.commit_block = dagcbor.encode_commit(self.did, rev, data, REPO_VERSION, signature)
        self.commit_cid = dagcbor.cid_for_block(self.commit_block)
        self.rev, self.data = rev, data

    def car_blocks(self) -> list[tuple[bytes, bytes]]:
        """Every block of the current repo, commit first, each once: the body of
        com.atproto.sync.getRepo. A snapshot (bytes are immutable), so it can be streamed
        while the generator keeps committing."""
        if self.commit_cid is None or self.commit_block is None:
            raise ValueError(f"{self.did} has no commit yet")
        blocks: dict[bytes, bytes] = {self.commit_cid: self.commit_block}
        for cid, block in self.mst.all_blocks():
            blocks.setdefault(cid, block)
        for cid, block in self.records.values():
            blocks.setdefault(cid, block)
        return list(blocks.items())

    def full_car(self) -> bytes:
        """The whole repo as a CAR (com.atproto.sync.getRepo): commit, every node, records."""
        assert self.commit_cid is not None
        return dagcbor.write_car(self.commit_cid, self.car_blocks())
