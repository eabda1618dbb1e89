"""Repo chain checks of sync 1.1 (https://atproto.com/specs/sync): a gate step (`Screen`).

Every `#commit` names the repo state it was built on: `since` (the rev of the repo's previous
commit) and `prevData` (the MST root before it). A consumer that remembers each repo's head
can tell, commit by commit, whether it saw the whole chain:

  * a commit from an account that is not active is dropped (`account_inactive`): a relay
    must not pass it on, and the host may not serve it later (indigo's relay scenario
    "deactivation"). The repo is also queued for a resync: a compliant relay passing such a
    commit means we missed the `#account` that reactivated it (a gap in the stream); the
    resync then finds the repo served by its PDS and marks the account active again, or is
    refused (RepoDeactivated) and changes nothing. Without it, a missed reactivation would
    drop every later commit of the account;
  * a commit whose rev is not above the repo's rev is dropped (`rev_not_newer`): revs only
    grow, so it is a replay or a forgery, and applying it could only write stale rows
    (relay scenario "rev_ordering");
  * a commit whose `since` or `prevData` differs from the stored head means events were
    missed (a gap in the stream, a relay that lost data): the repo is queued for a resync
    from its PDS (`since_mismatch`, `prev_data_mismatch`). The commit itself is still
    applied: its rows carry its rev, so the later snapshot converges with them (DESIGN.md
    invariant 2), and dropping it would only lose data until the resync ran;
  * a `#sync` event says the host reset the repo to a new state without the commits in
    between: resync (`sync_event`);
  * `#account` events switch the account between active and inactive, in stream order.

`judge` is the PURE part (states + events in, verdict + new states out); `ChainScreen` adds
the I/O: repo heads (`actors.rev`, `data_cid`, `active`) loaded in ONE query per slice for
the repos not in its bounded LRU cache. The cache holds the state the STREAM left behind,
including that of events in a batch not yet committed (the worker screens batch N+1 while
batch N's transaction runs), which is why it must hold more repos than two batches touch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from firehose.live.gate import Verdict
from firehose.model import AccountEvent, CommitEvent, Event, SyncEvent
from firehose.storage import queries
from firehose.storage.database import QUERY_RETRY_ERRORS

log = logging.getLogger("firehose.chain")

# Repos whose head is kept in memory: ~400 bytes each, 80 MB at the default (tracemalloc). A
# miss costs one batched primary-key probe, so the size trades memory for database reads. It
# is at least the repos of the two batches in flight (2 x BATCH_MAX_EVENTS, at most 100,000
# each): a repo evicted while its batch is uncommitted would be reloaded stale and flagged for
# nothing.
CHAIN_CACHE_MAX_REPOS = 200_000
# A repo held inactive is looked up again (its `active` flag only) at most this often: a resync
# may have found it served by its PDS and marked it active (a reactivation missed in a gap).
# Not at once: the database lags the stream by the batches in flight, and reading it then
# would undo a deactivation (or a rev) the stream gave the repo a moment ago.
CHAIN_INACTIVE_RECHECK_S = 10.0


@dataclass(frozen=True, slots=True)
class RepoState:
    """What the chain checks know of a repo: its latest rev and MST root, and whether the
    account may commit. None is unknown (a repo never seen, a head written without data)."""

    rev: str | None = None
    data_cid: str | None = None
    active: bool = True


UNKNOWN = RepoState()

OwnsDid = Callable[[str], bool]


def judge(
    events: Sequence[Event],
    states: Mapping[str, RepoState],
    verdict: Verdict,
    owns_did: OwnsDid | None = None,
) -> dict[str, RepoState]:
    """Apply the chain rules to `events` in stream order (skipping indexes the verdict already
    dropped), writing drops and resync requests into `verdict`. Returns the new state of every
    repo the events moved; `states` is not modified. Repos `owns_did` refuses (other shards')
    are not judged."""
    changed: dict[str, RepoState] = {}
    dropped = verdict.dropped
    for i, event in enumerate(events):
        if i in dropped or not isinstance(event, CommitEvent | SyncEvent | AccountEvent):
            continue
        did = event.did
        if owns_did is not None and not owns_did(did):
            continue
        state = changed.get(did) or states.get(did) or UNKNOWN
        if isinstance(event, CommitEvent):
            if not state.active:
                verdict.drop(i, "account_inactive")
                verdict.resync(did, "account_inactive")
                continue
            if state.rev is not None and event.rev <= state.rev:
                verdict.drop(i, "rev_not_newer")
                continue
            # Compared only when both sides are known: a repo first seen here has no stored
            # head, and legacy (pre sync 1.1) commits carry no prevData.
            if event.since is not None and state.rev is not None and event.since != state.rev:
                verdict.resync(did, "since_mismatch")
            elif (
                event.prev_data is not None
                and state.data_cid is not None
                and event.prev_data != state.data_cid
            ):
                verdict.resync(did, "prev_data_mismatch")
            changed[did] = RepoState(event.rev, event.data_cid, True)
        elif isinstance(event, SyncEvent):
            if state.rev is not None and event.rev <= state.rev:
                continue  # an older reset than what we hold: nothing to redo
            verdict.resync(did, "sync_event")
            # The #sync's MST root is in its commit block, which the decoder does not keep:
            # unknown, so the next commit's prevData is not compared (the resync fixes it).
            changed[did] = RepoState(event.rev, None, state.active)
        else:
            changed[did] = RepoState(state.rev, state.data_cid, event.active)
    return changed


# -- I/O -------------------------------------------------------------------------------------


async def load_repo_states(conn: Any, dids: list[str]) -> dict[str, RepoState]:
    """The stored heads of `dids` (one query); repos without an `actors` row are absent."""
    rows = await conn.fetch(queries.CHAIN_HEADS_LOAD, dids)
    return {r["did"]: RepoState(r["rev"], r["data_cid"], r["active"]) for r in rows}


Loader = Callable[[list[str]], Awaitable[dict[str, RepoState]]]


class ChainScreen:
    """The gate step of the chain checks: `judge` over an LRU cache of repo heads."""

    def __init__(
        self,
        load: Loader,
        *,
        max_repos: int = CHAIN_CACHE_MAX_REPOS,
        owns_did: OwnsDid | None = None,
        inactive_recheck_s: float = CHAIN_INACTIVE_RECHECK_S,
    ) -> None:
        self._load = load
        self._max_repos = max_repos
        self._owns_did = owns_did
        self._recheck_s = inactive_recheck_s
        self._cache: OrderedDict[str, RepoState] = OrderedDict()
        self._inactive_seen: dict[str, float] = {}  # did held inactive -> last looked up
        self.load_failures = 0

    def __len__(self) -> int:
        return len(self._cache)

    def state(self, did: str) -> RepoState | None:
        return self._cache.get(did)

    async def screen(self, events: Sequence[Event], verdict: Verdict) -> None:
        dids = self._dids(events, verdict)
        if not dids:
            return
        cache = self._cache
        now = time.monotonic()
        # A repo held inactive is looked up again now and then (CHAIN_INACTIVE_RECHECK_S).
        recheck = [d for d in dids if d in cache and self._recheck_due(d, now)]
        missing = [d for d in dids if d not in cache] + recheck
        states = {d: cache[d] for d in dids if d in cache}
        unchecked: set[str] = set()
        if missing:
            try:
                loaded = await self._load(missing)
                for did in recheck:
                    self._inactive_seen[did] = now
                    held, stored = cache[did], loaded.pop(did, None)
                    if stored is not None and stored.active:
                        # Only the flag: the stream's rev is newer than the stored one.
                        states[did] = RepoState(held.rev, held.data_cid, True)
                states.update(loaded)
            except QUERY_RETRY_ERRORS as exc:
                # The database is down: the batch's own commit will wait and retry. These
                # repos are judged as unknown (nothing dropped or flagged; the rev guards
                # still protect the rows) and not cached, so the next slice loads them.
                self.load_failures += 1
                unchecked = {d for d in missing if d not in cache}
                log.warning("chain checks skipped for %d repos: %s", len(unchecked), exc)
        changed = judge(events, states, verdict, self._owns_did)
        for did, state in changed.items():
            if did not in unchecked:
                self._remember(did, state)
        for did in missing:
            if did not in unchecked and did in states and did not in changed:
                self._remember(did, states[did])

    def _recheck_due(self, did: str, now: float) -> bool:
        if self._cache[did].active:
            return False
        return now - self._inactive_seen.setdefault(did, now) >= self._recheck_s

    def forget(self, dids: Iterable[str]) -> None:
        for did in dids:
            self._cache.pop(did, None)
            self._inactive_seen.pop(did, None)

    def _dids(self, events: Sequence[Event], verdict: Verdict) -> list[str]:
        seen: dict[str, None] = {}
        owns, dropped = self._owns_did, verdict.dropped
        for i, event in enumerate(events):
            if i in dropped or not isinstance(event, CommitEvent | SyncEvent | AccountEvent):
                continue
            if owns is None or owns(event.did):
                seen[event.did] = None
        return list(seen)

    def _remember(self, did: str, state: RepoState) -> None:
        cache = self._cache
        cache[did] = state
        cache.move_to_end(did)
        if state.active:
            self._inactive_seen.pop(did, None)
        else:
            self._inactive_seen.setdefault(did, time.monotonic())
        while len(cache) > self._max_repos:
            evicted, _ = cache.popitem(last=False)
            self._inactive_seen.pop(evicted, None)
