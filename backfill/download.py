"""One repo snapshot: ``com.atproto.sync.getRepo`` streamed, every block verified, then walked.

A repo export is a CAR whose root is the signed commit
(https://atproto.com/specs/repository#car-file-serialization). Big accounts export
hundreds of MB, so the CAR is never held in memory: `CarStreamReader` verifies every
block's sha256 as chunks arrive and each block goes to a disk spool (backfill.blocks:
an index of 16 bytes per block in memory, whatever the block size). The MST walk then
reads nodes and records back from it.

A repo whose CAR stays under MEMORY_SPOOL_MAX_BYTES (4 MiB: all but the biggest accounts)
skips the spool while the process's `MemoryBudget` (a share of BACKFILL_MAX_MEMORY_MB, over
all its repos in flight) has room for it: its blocks stay in a dict (`MemoryBlocks`) and the
completeness walk's MST entries are kept, so `writes` does not walk the tree again. It
spills to the spool the moment it grows past either, so memory stays bounded.

Before `fetch_repo` returns, the MST is walked once checking that every node and record
block is present: an export cut at a block boundary (which the CAR reader cannot notice)
becomes a transient `FetchError` instead of a silently partial snapshot.

With ``since`` (a window download, ``getRepo?since=``) the answer is a partial tree: the
reference PDS (atproto packages/pds actor-store/repo/sql-repo-reader.ts, getCarStream /
getBlockRange) sends only the blocks whose first-writing commit is newer than `since`
(``repoRev > since``), newest first, still under the current commit, and a CAR with the
root in its header and no block at all when nothing is newer. Every block present is
checked as above; a subtree or record whose block is absent is older than the window and is
skipped (counted). What a partial answer cannot show by itself is truncation: see
`backfill.since.check_partial` for the rule, and `backfill.window_fetch` for the whole
re-download it triggers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backfill.blocks import Blocks, MemoryBlocks, MemoryBudget, spill
from backfill.hosts import FetchError, HostClient
from backfill.since import (
    FALLBACK_NO_COMMIT,
    KIND_SINCE_EMPTY,
    KIND_SINCE_PARTIAL,
    KIND_WHOLE,
    PROFILE_SETTLED,
    PROFILE_UNKNOWN,
    Checked,
    SinceSuspect,
    check_partial,
)
from backfill.window import Window
from firehose.model import RecordWrite, SnapshotRecord, snapshot_record, snapshot_write
from firehose.protocol.car import Car, CarStreamReader
from firehose.protocol.cbor import decode_record
from firehose.protocol.cid import cid_bytes_from_str, cid_str_from_bytes
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import read_commit, walk_mst, walk_mst_partial
from firehose.protocol.syntax import is_nsid, is_record_key

GET_REPO_PATH = "/xrpc/com.atproto.sync.getRepo"
# A repo whose CAR stays under this is kept in memory (a dict of blocks, its MST entries
# remembered from the completeness walk): no spool file, no pread, one MST walk instead of
# two. Bigger ones spill to the disk spool as soon as they pass it, and so does a repo for
# which the process's MemoryBudget has no room left. The spool costs a pread per block and
# a second walk: `bench/backfill.py --repos 100 --records 5000` (1.5 MB CARs) took 24.1
# µs of the backfill's CPU per record against 16.6 for 500-record repos in memory (issue
# 11, session 31); it was 1 MiB before, when it also bounded memory alone.
MEMORY_SPOOL_MAX_BYTES = 4 * 1024 * 1024
# Repos held in memory with at most this many blocks are checked on the event loop, not in
# a thread (see fetch_repo); a real 137 KB CAR of 185 records (paul_staging) has 458.
INLINE_WALK_MAX_BLOCKS = 2000

SKIP_WINDOW = "window"
SKIP_INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    """A record not written: outside the window (``window``) or undecodable (``invalid``)."""

    reason: str
    collection: str = ""
    rkey: str = ""
    detail: str = ""


@dataclass
class RepoSnapshot:
    """A verified getRepo download, spooled to disk. Call `close` (or use ``with``).

    A ``since_empty`` answer knows no commit: its `rev` and `data_cid` are "" and `head`
    is None (no repo head is written for it)."""

    did: str
    rev: str
    commit_cid: str
    data_cid: str
    bytes_downloaded: int
    blocks: int = 0
    records: int = 0  # MST entries whose record block is present
    kind: str = KIND_WHOLE
    absent_subtrees: int = 0  # since_partial: MST subtrees older than `since`, skipped
    absent_records: int = 0  # since_partial: record blocks older than `since`, skipped
    profile: str = PROFILE_SETTLED
    # Set by backfill.window_fetch: why the `since` answer was replaced by a whole download,
    # the getRecord outcome of the profile, and the profile record it wrote (a write with
    # the getRecord commit's rev, yielded by `writes` under the same window rule).
    since_fallback: str | None = None
    profile_fetch: str | None = None
    extra: list[RecordWrite] = field(default_factory=list)
    _spool: Blocks | None = field(default=None, repr=False)
    # (key, record cid) in MST order, from the completeness walk of an in-memory repo.
    _entries: list[tuple[str, bytes]] | None = field(default=None, repr=False)

    @property
    def in_memory(self) -> bool:
        return isinstance(self._spool, MemoryBlocks)

    @property
    def head(self) -> tuple[str, str, str] | None:
        """(did, rev, data cid) of the commit this snapshot is a view of; None if unknown."""
        if self.kind == KIND_SINCE_EMPTY or not self.rev:
            return None
        return (self.did, self.rev, self.data_cid)

    def _walk(self, spool: Blocks) -> Iterator[tuple[str, bytes]]:
        if self._entries is not None:
            return iter(self._entries)
        if self.kind == KIND_SINCE_PARTIAL:
            return (e for e in walk_mst_partial(self.data_cid, spool.get) if type(e) is tuple)
        return walk_mst(self.data_cid, spool.get)

    def writes(self, window: Window) -> Iterator[RecordWrite | SkippedRecord]:
        """`items` with each record as its RecordWrite (CREATE of this snapshot's did): the
        form the tests and the fuzzer read; the backfill and resyncs write `items`."""
        did = self.did
        for item in self.items(window):
            yield item if isinstance(item, SkippedRecord) else snapshot_write(did, item)

    def items(self, window: Window) -> Iterator[SnapshotRecord | SkippedRecord]:
        """Records in MST key order at the snapshot's rev, or Skipped; then `extra` (the
        profile fetched with getRecord, at its own commit's rev) under the same window rule.
        A partial snapshot yields only the records present.

        Synchronous and CPU/disk bound: run it off the event loop for big repos. The window
        is applied to the rkey first, so a record outside a TID window is never read.
        """
        spool = self._spool
        if spool is None:
            raise ValueError("snapshot is closed")
        rev = self.rev
        partial = self.kind == KIND_SINCE_PARTIAL
        entries = self._walk(spool)
        nsids: dict[str, bool] = {}  # a repo has a handful of collections: check each once
        for key, cid in entries:
            collection, _, rkey = key.partition("/")
            valid = nsids.get(collection)
            if valid is None:
                valid = nsids[collection] = is_nsid(collection)
            if not valid or not is_record_key(rkey):
                yield SkippedRecord(SKIP_INVALID, collection[:100], rkey[:100], "bad MST key")
                continue
            verdict = window.rkey_verdict(rkey)
            if verdict is False:
                yield SkippedRecord(SKIP_WINDOW, collection, rkey)
                continue
            block = spool.get(cid)
            if block is None:
                if partial:
                    continue  # older than `since`: counted in absent_records, not received
                yield SkippedRecord(SKIP_INVALID, collection, rkey, "record block missing")
                continue
            try:
                record, sanitized = decode_record(block)
            except ProtocolError as exc:
                yield SkippedRecord(SKIP_INVALID, collection, rkey, str(exc))
                continue
            if verdict is None and not window.keeps(rkey, record, collection):
                yield SkippedRecord(SKIP_WINDOW, collection, rkey)
                continue
            yield (collection, rkey, rev, cid_str_from_bytes(cid), record, sanitized)
        for write in self.extra:
            if window.keeps(write.rkey, write.record, write.collection):
                yield snapshot_record(write)
            else:
                yield SkippedRecord(SKIP_WINDOW, write.collection, write.rkey)

    def close(self) -> None:
        """Remove the spool file (idempotent)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._entries = None

    def __enter__(self) -> RepoSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_snapshot(
    spool: Blocks,
    root_cid: bytes,
    did: str,
    entries: list[tuple[str, bytes]] | None = None,
    since: str | None = None,
) -> Checked:
    """Seal the spool; commit checks and the completeness walk (the partial walk of
    `backfill.since.check_partial` for a `since` answer). The walk's (key, cid) pairs of
    present records are appended to `entries` when given."""
    spool.seal()
    commit_block = spool.get(root_cid)
    if commit_block is None:
        if since is not None:
            # The commit is the newest block of all: the reference streams it first. Blocks
            # without it cannot be checked against anything.
            raise SinceSuspect(FALLBACK_NO_COMMIT)
        raise FetchError("truncated", "root commit block is not in the CAR", transient=True)
    try:
        info = read_commit(Car(cid_str_from_bytes(root_cid), root_cid, {root_cid: commit_block}))
    except ProtocolError as exc:
        raise FetchError("bad_response", f"commit: {exc}", transient=False) from None
    if info.did != did:
        # A PDS must not be able to serve another account's repo as this one's.
        raise FetchError("bad_response", f"commit is for {info.did[:80]}", transient=False)
    # A repo v2 commit (no rev) is read with the rev V2_COMMIT_REV, which any later v3 commit
    # supersedes (firehose.protocol.mst: how and why it differs from the reference).
    if since is not None:
        return check_partial(spool, info.rev, info.cid, info.data_cid, since, entries)
    records = 0
    try:
        for key, cid in walk_mst(cid_bytes_from_str(info.data_cid), spool.get):
            if not spool.has_key_for(cid):
                raise ProtocolError("missing_block", "record block missing")
            records += 1
            if entries is not None:
                entries.append((key, cid))
    except ProtocolError as exc:
        if exc.reason == "missing_block":
            raise FetchError("truncated", f"incomplete repo: {exc}", transient=True) from None
        raise FetchError("bad_response", f"MST: {exc}", transient=False) from None
    return Checked(info.rev, info.cid, info.data_cid, records)


async def fetch_repo(
    http: HostClient,
    pds: str,
    did: str,
    *,
    max_bytes: int,
    spool_dir: Path,
    memory_max_bytes: int | None = None,
    since: str | None = None,
    memory: MemoryBudget | None = None,
) -> RepoSnapshot:
    """Download, verify and spool `did`'s repo from `pds` (with `since`: what was written
    after that rev, a partial tree; see the module doc).

    Raises FetchError for anything the network or the PDS did wrong; SinceSuspect when a
    `since` answer lacks a block it should hold; OSError only for local spool failures
    (disk full).
    """
    if memory_max_bytes is None:
        memory_max_bytes = MEMORY_SPOOL_MAX_BYTES
    url = pds.rstrip("/") + GET_REPO_PATH
    params = {"did": did} if since is None else {"did": did, "since": since}
    reader = CarStreamReader()
    spool: Blocks = MemoryBlocks(memory)
    try:
        async with http.stream(url, params, max_bytes=max_bytes) as chunks:
            async for chunk in chunks:
                if reader.bytes_read + len(chunk) > max_bytes:
                    raise FetchError("too_large", f"CAR over {max_bytes} B", transient=False)
                try:
                    for cid, block in reader.feed(chunk):
                        spool.add(cid, block)
                except ProtocolError as exc:
                    reason = "too_large" if exc.reason == "too_large" else "bad_response"
                    raise FetchError(reason, f"CAR: {exc}", transient=False) from None
                if isinstance(spool, MemoryBlocks) and not spool.reserve(memory_max_bytes):
                    spool = spill(spool, spool_dir)
        try:
            reader.close()
        except ProtocolError as exc:
            # Complete at the HTTP level but cut inside a section: retry.
            raise FetchError("truncated", f"CAR: {exc}", transient=True) from None
        assert reader.root_cid is not None
        if since is not None and spool.blocks == 0:
            # The reference's answer when no block is newer than `since`: the header names
            # the current commit, and not even the commit block follows. Nothing in the
            # window; the commit (hence the rev) stays unknown.
            return RepoSnapshot(
                did=did,
                rev="",
                commit_cid=cid_str_from_bytes(reader.root_cid),
                data_cid="",
                bytes_downloaded=reader.bytes_read,
                kind=KIND_SINCE_EMPTY,
                profile=PROFILE_UNKNOWN,
                _spool=spool,
                _entries=[],
            )
        # The walk decodes every MST node. A small repo held in memory walks on the event
        # loop: a thread would add ~70 µs of CPU per repo (hand-off, wake-up, result; uvloop
        # on this machine), about 7 % of a small repo's whole cost, and contend with the
        # loop for the GIL. paul_staging's 458 blocks walk in 0.22 ms; the block count
        # (INLINE_WALK_MAX_BLOCKS) bounds what a hostile repo can hold the loop for.
        # Bigger repos walk off the event loop, which also serves the live stream.
        in_memory = isinstance(spool, MemoryBlocks)
        entries: list[tuple[str, bytes]] | None = [] if in_memory else None
        if in_memory and spool.blocks <= INLINE_WALK_MAX_BLOCKS:
            checked = _check_snapshot(spool, reader.root_cid, did, entries, since)
        else:
            checked = await asyncio.to_thread(
                _check_snapshot, spool, reader.root_cid, did, entries, since
            )
    except SinceSuspect as exc:
        spool.close()
        exc.bytes_downloaded = reader.bytes_read
        raise
    except BaseException:
        spool.close()
        raise
    return checked_snapshot(did, checked, spool, entries, reader.bytes_read)


def checked_snapshot(
    did: str,
    checked: Checked,
    spool: Blocks,
    entries: list[tuple[str, bytes]] | None,
    bytes_downloaded: int,
) -> RepoSnapshot:
    """The snapshot of a download that `_check_snapshot` passed: it owns `spool` from here.
    Also the benchmarks' and fuzzers' way to make one from CAR bytes without HTTP."""
    return RepoSnapshot(
        did=did,
        rev=checked.rev,
        commit_cid=checked.commit_cid,
        data_cid=checked.data_cid,
        bytes_downloaded=bytes_downloaded,
        blocks=spool.blocks,
        records=checked.records,
        kind=checked.kind,
        absent_subtrees=checked.absent_subtrees,
        absent_records=checked.absent_records,
        profile=checked.profile,
        _spool=spool,
        _entries=entries,
    )
