"""A window download: ``getRepo?since=``, the whole repo when the answer is suspect, and the
account's profile through ``getRecord`` when the answer does not settle it. I/O.

1. With `since` None (``BACKFILL_DAYS=-1``, ``BACKFILL_SINCE=false``, resyncs): the whole
   repo, exactly `download.fetch_repo`.
2. With `since`: `fetch_repo(since=...)`. A `SinceSuspect` (the answer lacks a block that
   must be newer than `since`: `backfill.since.check_partial`) -> the repo is downloaded
   again WHOLE, and `snapshot.since_fallback` says why; a whole download lacking a block
   is `truncated` (transient) as always. Data is never silently lost to a bad partial
   answer, it costs bandwidth instead.
3. The profile (``app.bsky.actor.profile/self``) is current state that is often older than
   the window. When the answer does not settle it (its block, or a node on its path, was
   older than `since`; or the answer was empty), it is fetched with getRecord from the same
   PDS through the same polite client and verified (`record_fetch`), and the record is
   added to the snapshot's writes with the getRecord commit's rev: the writer's rev guard
   makes it converge with live writes of the profile. RecordNotFound, or a proof of
   absence, is "no profile". A transient failure raises (the repo is retried as usual; its
   other records are then written again, idempotently under the rev guard); any other
   failure (a tampered or malformed proof) is logged and counted, the profile is not
   written, and the repo's other records still are.
4. An empty answer whose getRecord commit is newer than `since` contradicts itself (that
   commit, at least, is a block newer than `since`): the repo is downloaded whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path

from backfill import download
from backfill.blocks import MemoryBudget
from backfill.download import RepoSnapshot
from backfill.hosts import FetchError, HostClient
from backfill.record_fetch import RecordFetch, fetch_record
from backfill.since import (
    FALLBACK_EMPTY_NEWER,
    KIND_SINCE_EMPTY,
    PROFILE_COLLECTION,
    PROFILE_RKEY,
    PROFILE_UNKNOWN,
    SinceSuspect,
)

log = logging.getLogger("backfill")

PROFILE_FOUND = "found"
PROFILE_ABSENT = "absent"
PROFILE_ERROR = "error"
PROFILE_OUTCOMES = (PROFILE_FOUND, PROFILE_ABSENT, PROFILE_ERROR)
# A transient failure of the small getRecord (a 5xx, a reset connection) is retried in place
# a few times before it fails the attempt: failing it would download the repo again, and
# with two requests per attempt a host failing 20% of requests failed ~0.6% of repos for
# good (five failed attempts in a row) where one request per attempt failed 0.03%.
PROFILE_TRIES = 3
PROFILE_RETRY_S = 0.5  # x the try number


async def fetch_window(
    http: HostClient,
    pds: str,
    did: str,
    *,
    since: str | None,
    want_profile: bool,
    max_bytes: int,
    spool_dir: Path,
    memory_max_bytes: int | None = None,
    memory: MemoryBudget | None = None,
) -> RepoSnapshot:
    """`did`'s repo from `pds`: the part written after `since` (None: the whole repo) plus,
    with `want_profile`, its current profile when that part does not settle it."""
    fetch_repo = download.fetch_repo  # looked up at call time (tests substitute it)

    def get_repo(after: str | None = None) -> Awaitable[RepoSnapshot]:
        """getRepo of `did` (what was written after `after`; None: whole), within the same
        bounds for every attempt."""
        return fetch_repo(
            http, pds, did, max_bytes=max_bytes, spool_dir=spool_dir,
            memory_max_bytes=memory_max_bytes, since=after, memory=memory,
        )  # fmt: skip

    async def whole(reason: str, spent: int) -> RepoSnapshot:
        snap = await get_repo()
        snap.since_fallback = reason
        snap.bytes_downloaded += spent
        return snap

    if since is None:
        return await get_repo()
    try:
        snap = await get_repo(since)
    except SinceSuspect as suspect:
        log.info(
            "[BACKFILL] %s: getRepo since=%s answer lacks a block newer than since (%s); "
            "downloading it whole",
            did, since, suspect.reason,
        )  # fmt: skip
        return await whole(suspect.reason, suspect.bytes_downloaded)
    if not want_profile or snap.profile != PROFILE_UNKNOWN:
        return snap
    try:
        try:
            got = await _fetch_profile(http, pds, did)
        except FetchError as exc:
            if exc.transient:
                raise
            log.warning("[BACKFILL] %s: profile not written, getRecord failed: %s", did, exc)
            snap.profile_fetch = PROFILE_ERROR
            return snap
        snap.bytes_downloaded += got.bytes_downloaded
        if snap.kind == KIND_SINCE_EMPTY and got.rev is not None and got.rev > since:
            spent = snap.bytes_downloaded
            snap.close()
            log.info(
                "[BACKFILL] %s: getRepo since=%s answered no block but the repo's commit is "
                "%s; downloading it whole",
                did, since, got.rev,
            )  # fmt: skip
            return await whole(FALLBACK_EMPTY_NEWER, spent)
        snap.profile_fetch = PROFILE_FOUND if got.proof and got.proof.write else PROFILE_ABSENT
        if got.proof is not None and got.proof.write is not None:
            snap.extra.append(got.proof.write)
    except BaseException:
        snap.close()
        raise
    return snap


async def _fetch_profile(http: HostClient, pds: str, did: str) -> RecordFetch:
    """getRecord of the profile, a transient failure retried in place (not a 429: the host
    is paused then, and the repo waits for it without counting an attempt)."""
    for attempt in range(1, PROFILE_TRIES + 1):
        try:
            return await fetch_record(http, pds, did, PROFILE_COLLECTION, PROFILE_RKEY)
        except FetchError as exc:
            if not exc.transient or exc.reason == "rate_limited" or attempt == PROFILE_TRIES:
                raise
            await asyncio.sleep(PROFILE_RETRY_S * attempt)
    raise AssertionError("unreachable")
