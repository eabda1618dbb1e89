"""PURE rules of a window download (``com.atproto.sync.getRepo?since=``).

The reference PDS (atproto packages/pds actor-store/repo/sql-repo-reader.ts, getCarStream /
getBlockRange) answers ``since`` with the blocks whose first-writing commit is newer
(``repoRev > since``; its block store keeps each block's first rev), streamed newest first
(``ORDER BY repoRev DESC, cid DESC``) under a header naming the CURRENT commit; when nothing
is newer the CAR names the root and holds no block at all, not even the commit. So the
answer is a partial tree: `check_partial` walks it (`firehose.protocol.mst.
walk_mst_partial`), skipping what is older, and decides whether the answer can be trusted
(else `SinceSuspect`: the caller, `backfill.window_fetch`, downloads the repo whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from backfill.hosts import FetchError
from firehose.protocol.cid import cid_bytes_from_str
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import (
    MST_ABSENT,
    MST_FOUND,
    MissingSubtree,
    mst_lookup,
    walk_mst_partial,
)
from firehose.protocol.syntax import is_tid

# What a getRepo answer was (the `backfill_window_downloads_total` label): the whole repo
# (asked without `since`); with `since`: a partial tree, a complete tree (the PDS ignored
# `since`, or every block is newer), or no block at all (nothing newer than `since`).
KIND_WHOLE = "whole"
KIND_SINCE_PARTIAL = "since_partial"
KIND_SINCE_WHOLE = "since_whole_answer"
KIND_SINCE_EMPTY = "since_empty"
DOWNLOAD_KINDS = (KIND_WHOLE, KIND_SINCE_PARTIAL, KIND_SINCE_WHOLE, KIND_SINCE_EMPTY)

# The account's profile is one record at a fixed key (app.bsky.actor.profile lexicon: key
# "literal:self"). Whether a snapshot settles it: `PROFILE_SETTLED` (the tree is whole, or
# the record or its absence is proven by the blocks present) or `PROFILE_UNKNOWN` (its
# record block or a node on its path was older than `since`: fetch it with getRecord).
PROFILE_COLLECTION = "app.bsky.actor.profile"
PROFILE_RKEY = "self"
PROFILE_KEY = f"{PROFILE_COLLECTION}/{PROFILE_RKEY}"
PROFILE_SETTLED = "settled"
PROFILE_UNKNOWN = "unknown"

# Why a `since` answer is not trusted as a partial tree (`backfill_since_fallbacks_total`):
# the repo is then downloaded whole (see `check_partial`).
FALLBACK_NO_COMMIT = "no_commit"
FALLBACK_RECORD = "record_in_window_absent"
FALLBACK_SUBTREE = "subtree_in_window_absent"
FALLBACK_OLD_COMMIT = "commit_not_after_since"
FALLBACK_EMPTY_NEWER = "empty_but_newer_commit"
FALLBACK_REASONS = (
    FALLBACK_NO_COMMIT,
    FALLBACK_RECORD,
    FALLBACK_SUBTREE,
    FALLBACK_OLD_COMMIT,
    FALLBACK_EMPTY_NEWER,
)


class SinceSuspect(Exception):
    """A `since` answer lacks a block it should hold: download the repo whole instead."""

    def __init__(self, reason: str, bytes_downloaded: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bytes_downloaded = bytes_downloaded


class BlockSource(Protocol):
    """The sealed blocks of a download (`backfill.blocks.BlockSpool` / `MemoryBlocks`)."""

    def get(self, cid: bytes) -> bytes | None: ...

    def has_key_for(self, cid: bytes) -> bool: ...


@dataclass(slots=True)
class Checked:
    rev: str
    commit_cid: str
    data_cid: str
    records: int
    kind: str = KIND_WHOLE
    absent_subtrees: int = 0
    absent_records: int = 0
    profile: str = PROFILE_SETTLED


def check_partial(
    spool: BlockSource,
    rev: str,
    commit_cid: str,
    data_cid: str,
    since: str,
    entries: list[tuple[str, bytes]] | None,
) -> Checked:
    """The walk of a `since` answer: absent subtrees and record blocks are older than the
    window and skipped (counted), unless the tree itself shows that a block newer than
    `since` is missing, which raises `SinceSuspect` (the caller downloads the repo whole).

    Why a rule is needed and which one. Missing blocks are the normal shape of a `since`
    answer, so they cannot reveal a truncated one; and the reference streams blocks newest
    first (ORDER BY repoRev DESC), so an export cut short loses the OLDEST in-window blocks,
    exactly those that look like "older than since". An HTTP-level cut is caught below us
    (Content-Length, or a chunked body without its last chunk: `truncated`); what remains is
    a body that ends cleanly at a block boundary (a buggy proxy or PDS). The evidence the
    tree itself gives, each a block that must be newer than `since` (the reference inserts
    every block with the rev of the commit that first wrote it, and a node or record that a
    commit after `since` created or changed is a new block):

    * the commit block is absent while others are present (`_check_snapshot`): the commit
      is the newest block of all;
    * a present node names a record whose key is a TID at or after `since`: a record
      created in the window is a block of the window (TIDs are times; rkeys and revs come
      from the same writer's clock);
    * a present node links a subtree lying between two keys of one collection that are both
      TIDs at or after `since`: every TID key of that subtree was created in the window,
      so the subtree's node was rewritten after `since`;
    * the commit's rev is not after `since` (nothing can be newer than the commit) and yet
      a block is absent: the PDS did not answer with `since` semantics, so this is a whole
      answer with holes.

    Each costs one whole re-download, never data. A block legitimately older although it
    matches a rule (a record whose content, hence CID, already existed before `since`; an
    rkey from a writer whose clock ran ahead) only costs that re-download. Not caught: a cut
    that removes only blocks none of these rules can date (an old-looking subtree
    that held only records with non-TID keys). docs/backfill-window.md says the same."""
    data = cid_bytes_from_str(data_cid)
    not_after = rev <= since
    records = absent_subtrees = absent_records = 0
    try:
        for item in walk_mst_partial(data, spool.get):
            if type(item) is MissingSubtree:
                absent_subtrees += 1
                if not_after:
                    raise SinceSuspect(FALLBACK_OLD_COMMIT)
                if _in_window_between(item.after, item.before, since):
                    raise SinceSuspect(FALLBACK_SUBTREE)
                continue
            assert type(item) is tuple
            key, cid = item
            if not spool.has_key_for(cid):
                absent_records += 1
                if not_after:
                    raise SinceSuspect(FALLBACK_OLD_COMMIT)
                rkey = key.partition("/")[2]
                if is_tid(rkey) and rkey > since:
                    raise SinceSuspect(FALLBACK_RECORD)
                continue
            records += 1
            if entries is not None:
                entries.append((key, cid))
        absent = absent_subtrees + absent_records
        profile = PROFILE_SETTLED
        if absent:
            found, profile_cid = mst_lookup(data, PROFILE_KEY, spool.get)
            proven = found == MST_ABSENT or (
                found == MST_FOUND and profile_cid is not None and spool.has_key_for(profile_cid)
            )
            profile = PROFILE_SETTLED if proven else PROFILE_UNKNOWN
    except ProtocolError as exc:
        raise FetchError("bad_response", f"MST: {exc}", transient=False) from None
    kind = KIND_SINCE_PARTIAL if absent else KIND_SINCE_WHOLE
    return Checked(
        rev, commit_cid, data_cid, records, kind, absent_subtrees, absent_records, profile
    )


def _in_window_between(after: str | None, before: str | None, since: str) -> bool:
    """Whether every TID key strictly between `after` and `before` is at/after `since`: both
    bounds in one collection, both TID keys, the lower one after `since`."""
    if after is None or before is None:
        return False
    collection, _, low = after.partition("/")
    other, _, high = before.partition("/")
    return collection == other and is_tid(low) and is_tid(high) and low > since
