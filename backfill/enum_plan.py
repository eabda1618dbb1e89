"""Which enumeration a job uses and where it stands: the pure rules behind enumeration.py.

A job enumerates repos with one of two relay methods (its `list_method`, sql/006):

* ``listRepos``: every repo on the relay, with each repo's latest ``rev``;
* ``listReposByCollection``: the repos holding a collection, one pass per NSID of
  WANTED_COLLECTIONS (sorted, so every process and every restart agrees on the order), used
  only when every entry is an exact NSID: a prefix entry (``app.bsky.graph.*``) cannot be
  asked for, so it means listRepos. A repo found in several passes is queued once (the
  queue's primary key).

The job row holds `EnumState` (method, the pass's NSID, the relay's cursor, the passes
done); `next_step` turns it and the current settings into the next request, `after_page`
into the state to save with that page's repos, in the same transaction. A job that began
by collection and restarts with settings that no longer allow it (a prefix entry added,
BACKFILL_BY_COLLECTION=false) pages listRepos from the start: its passes covered only some
repos. A job on listRepos stays on it (it already covers every repo). PURE.
"""

from __future__ import annotations

from dataclasses import dataclass

from firehose.protocol.syntax import is_nsid

LIST_REPOS = "listRepos"
BY_COLLECTION = "listReposByCollection"


def collection_passes(wanted: tuple[str, ...], enabled: bool) -> tuple[str, ...]:
    """The NSIDs to enumerate by collection, sorted and unique; () means listRepos (the
    setting is off, WANTED_COLLECTIONS is empty, or one entry is not an exact NSID)."""
    if not enabled or not wanted or not all(is_nsid(w) for w in wanted):
        return ()
    return tuple(sorted(set(wanted)))


@dataclass(frozen=True, slots=True)
class EnumState:
    """The job row's enumeration columns."""

    method: str | None  # None: no page saved yet
    collection: str | None  # the current pass's NSID (by collection)
    cursor: str | None  # the relay's cursor within the current pass
    done: tuple[str, ...] = ()  # NSIDs whose pass ended


@dataclass(frozen=True, slots=True)
class Step:
    """One request: `method` for `collection` (None for listRepos) after `cursor`."""

    method: str
    collection: str | None
    cursor: str | None


def next_step(state: EnumState, passes: tuple[str, ...]) -> Step | None:
    """The next request, or None when every pass is done (nothing left to ask)."""
    if state.method == LIST_REPOS or (state.method is None and state.cursor is not None):
        # (No method but a cursor: a job that was paging listRepos before sql/006 added the
        # column; it goes on where it was rather than re-reading and re-counting pages.)
        return Step(LIST_REPOS, None, state.cursor)
    if not passes:
        # Never started (cursor None), or started by collection under other settings:
        # listRepos from the start either way.
        return Step(LIST_REPOS, None, None)
    remaining = [n for n in passes if n not in state.done]
    if state.method == BY_COLLECTION and state.collection in remaining:
        return Step(BY_COLLECTION, state.collection, state.cursor)
    if not remaining:
        return None
    return Step(BY_COLLECTION, remaining[0], None)


def after_page(
    step: Step, next_cursor: str | None, passes: tuple[str, ...], done: tuple[str, ...]
) -> tuple[EnumState, bool]:
    """The state once the page `step` fetched is saved, and whether enumeration is done."""
    if step.method == LIST_REPOS:
        return EnumState(LIST_REPOS, None, next_cursor, done), next_cursor is None
    if next_cursor is not None:
        return EnumState(BY_COLLECTION, step.collection, next_cursor, done), False
    if step.collection is not None and step.collection not in done:
        done = (*done, step.collection)
    remaining = [n for n in passes if n not in done]
    if remaining:
        return EnumState(BY_COLLECTION, remaining[0], None, done), False
    return EnumState(BY_COLLECTION, None, None, done), True
