"""Sync 1.1 repo chain checks (firehose/live/chain.py): the pure rules, the cache, the
persistence of resync requests with the cursor (real PostgreSQL)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firehose.devnet.dagcbor import cid_for_block
from firehose.live.batch import BatchBuilder
from firehose.live.chain import ChainScreen, RepoState, judge, load_repo_states
from firehose.live.gate import Verdict
from firehose.model import (
    AccountEvent,
    Action,
    Batch,
    CommitEvent,
    Event,
    IdentityEvent,
    RecordWrite,
    SyncEvent,
)
from firehose.storage.snapshots import write_snapshot
from firehose.storage.writer import apply_batch

COMMIT = cid_for_block(b"a commit")  # a binary CID (CommitEvent.commit)
DIDS = ("did:plc:aaa", "did:plc:bbb", "did:plc:ccc")


def rev(n: int) -> str:
    """A TID-shaped rev that sorts like n (13 base32-sortable characters)."""
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(13):
        n, r = divmod(n, 32)
        out = alphabet[r] + out
    return out


def commit(
    seq: int,
    did: str,
    rev_: str,
    since: str | None,
    prev_data: str | None = None,
    data_cid: str | None = None,
    writes: tuple[RecordWrite, ...] = (),
) -> CommitEvent:
    return CommitEvent(seq, did, rev_, since, COMMIT, prev_data, None, writes, data_cid=data_cid)


# -- the pure rules, property-based -------------------------------------------------------------

# One step of a repo's stream: (did index, rev number, since: True = the previous rev, else a
# random one, prevData: True = the previous data, False = another, None = absent).
steps = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(1, 30),
        st.one_of(st.just(True), st.integers(0, 31)),
        st.sampled_from([True, False, None]),
    ),
    max_size=40,
)


@given(steps=steps, pre_dropped=st.sets(st.integers(0, 39), max_size=5))
@settings(max_examples=300, deadline=None)
def test_drops_exactly_the_non_increasing_revs_and_flags_exactly_the_mismatches(
    steps: list[tuple[int, int, Any, Any]], pre_dropped: set[int]
) -> None:
    # The stream is built as the PDS would send it plus noise: `since`/`prevData` name the
    # previous event of the repo IN THE STREAM (correct) or something else (a gap).
    events: list[Event] = []
    last_sent: dict[str, tuple[str, str]] = {}
    for seq, (d, n, since_ok, prev_ok) in enumerate(steps):
        did = DIDS[d]
        sent = last_sent.get(did)
        since = sent[0] if since_ok is True and sent else (rev(since_ok) if since_ok else None)
        if prev_ok is None:
            prev = None
        elif prev_ok and sent:
            prev = sent[1]
        else:
            prev = f"data-other-{seq}"
        events.append(commit(seq, did, rev(n), since, prev, f"data-{seq}"))
        last_sent[did] = (rev(n), f"data-{seq}")

    verdict = Verdict(dropped={i: "bad_signature" for i in pre_dropped if i < len(events)})
    before = dict(verdict.dropped)
    new_states = judge(events, {}, verdict)

    # The oracle, per repo: what was accepted so far.
    accepted: dict[str, tuple[str, str | None]] = {}
    want_drops: dict[int, str] = dict(before)
    want_flags: dict[str, str] = {}
    for i, e in enumerate(events):
        assert isinstance(e, CommitEvent)
        if i in before:
            continue
        head = accepted.get(e.did)
        if head is not None and e.rev <= head[0]:
            want_drops[i] = "rev_not_newer"
            continue
        if head is not None:
            if e.since is not None and e.since != head[0]:
                want_flags.setdefault(e.did, "since_mismatch")
            elif e.prev_data is not None and head[1] is not None and e.prev_data != head[1]:
                want_flags.setdefault(e.did, "prev_data_mismatch")
        accepted[e.did] = (e.rev, e.data_cid)
    assert verdict.dropped == want_drops
    assert verdict.resyncs == want_flags
    assert {d: (s.rev, s.data_cid) for d, s in new_states.items()} == accepted


@given(revs=st.lists(st.integers(1, 50), min_size=1, max_size=30), start=st.integers(0, 50))
@settings(max_examples=200, deadline=None)
def test_stored_head_is_the_floor(revs: list[int], start: int) -> None:
    """With a stored head, a commit is kept iff its rev is above every rev kept before it."""
    did = DIDS[0]
    events: list[Event] = [commit(i, did, rev(n), None) for i, n in enumerate(revs)]
    verdict = Verdict()
    judge(events, {did: RepoState(rev(start), None, True)}, verdict)
    floor, kept = start, []
    for i, n in enumerate(revs):
        if n > floor:
            kept.append(i)
            floor = n
    assert sorted(set(range(len(revs))) - verdict.dropped.keys()) == kept
    assert set(verdict.dropped.values()) <= {"rev_not_newer"}
    assert verdict.resyncs == {}  # since/prevData absent: nothing to compare


def test_account_status_in_stream_order() -> None:
    did = DIDS[0]
    events: list[Event] = [
        commit(1, did, rev(1), None),
        AccountEvent(2, did, None, False, "deactivated"),
        commit(3, did, rev(2), rev(1)),
        IdentityEvent(4, did, None, "x.test"),
        AccountEvent(5, did, None, True),
        commit(6, did, rev(3), rev(2)),  # since names the commit dropped while inactive
    ]
    verdict = Verdict()
    states = judge(events, {}, verdict)
    assert verdict.dropped == {2: "account_inactive"}
    # Queued by the dropped commit (a missed reactivation?), before the since mismatch.
    assert verdict.resyncs == {did: "account_inactive"}
    assert states[did] == RepoState(rev(3), None, True)
    # A stored inactive status is honoured too, and a status update is never dropped.
    verdict = Verdict()
    judge([commit(7, did, rev(9), None), AccountEvent(8, did, None, True)],
          {did: RepoState(rev(3), "d", False)}, verdict)  # fmt: skip
    assert verdict.dropped == {0: "account_inactive"}


def test_sync_event_requests_a_resync_and_resets_the_head() -> None:
    did = DIDS[1]
    events: list[Event] = [
        SyncEvent(1, did, rev(5), "c", None),
        commit(2, did, rev(6), rev(5), "anything"),  # prevData unknown after #sync
        SyncEvent(3, did, rev(4), "c", None),  # older than the head: ignored
    ]
    verdict = Verdict()
    states = judge(events, {did: RepoState(rev(2), "d2", True)}, verdict)
    assert verdict.resyncs == {did: "sync_event"} and verdict.dropped == {}
    assert states[did].rev == rev(6)


def test_other_shards_repos_are_not_judged() -> None:
    verdict = Verdict()
    events: list[Event] = [commit(1, DIDS[0], rev(1), None), commit(2, DIDS[0], rev(1), None)]
    states = judge(events, {}, verdict, owns_did=lambda did: did != DIDS[0])
    assert verdict.dropped == {} and states == {}


# -- the screen: cache, one load per slice, database outage --------------------------------------


class CountingLoader:
    def __init__(self, stored: dict[str, RepoState], fail: bool = False) -> None:
        self.stored = stored
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, dids: list[str]) -> dict[str, RepoState]:
        self.calls.append(list(dids))
        if self.fail:
            raise OSError("connection refused")
        return {d: self.stored[d] for d in dids if d in self.stored}


@pytest.mark.asyncio
async def test_screen_loads_missing_repos_once_and_bounds_its_cache() -> None:
    loader = CountingLoader({DIDS[0]: RepoState(rev(10), "d10", True)})
    screen = ChainScreen(loader, max_repos=2)
    verdict = Verdict()
    await screen.screen(
        [commit(1, DIDS[0], rev(10), None), commit(2, DIDS[1], rev(1), None)], verdict
    )
    assert loader.calls == [[DIDS[0], DIDS[1]]]  # one query for the slice
    assert verdict.dropped == {0: "rev_not_newer"}
    verdict = Verdict()
    await screen.screen([commit(3, DIDS[1], rev(2), rev(1))], verdict)
    assert len(loader.calls) == 1 and verdict == Verdict()  # served from the cache
    await screen.screen([commit(4, DIDS[2], rev(1), None)], Verdict())
    assert len(screen) == 2 and screen.state(DIDS[0]) is None  # least recently used evicted
    assert screen.state(DIDS[1]) == RepoState(rev(2), None, True)


@pytest.mark.asyncio
async def test_database_outage_skips_the_checks_without_caching() -> None:
    loader = CountingLoader({DIDS[0]: RepoState(rev(10), None, True)}, fail=True)
    screen = ChainScreen(loader)
    verdict = Verdict()
    await screen.screen([commit(1, DIDS[0], rev(3), None)], verdict)
    assert verdict == Verdict() and len(screen) == 0 and screen.load_failures == 1
    loader.fail = False
    await screen.screen([commit(2, DIDS[0], rev(4), None)], verdict)
    assert verdict.dropped == {0: "rev_not_newer"}  # checked again once the database is back


# -- real PostgreSQL: stored heads, requests saved with the cursor -------------------------------


def _like(did: str, rkey: str, rev_: str) -> RecordWrite:
    record = {"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z"}
    return RecordWrite(did, "app.bsky.feed.like", rkey, rev_, Action.CREATE, "bafycid", record)


async def _admit(conn: asyncpg.Connection, screen: ChainScreen, events: list[Event]) -> Verdict:
    verdict = Verdict()
    await screen.screen(events, verdict)
    builder = BatchBuilder()
    for i, e in enumerate(events):
        (builder.skip if i in verdict.dropped else builder.add)(e)
    for did, reason in verdict.resyncs.items():
        builder.request_resync(did, reason)
    batch = builder.take()
    await apply_batch(conn, batch, heads=batch.heads)
    return verdict


async def _resyncs(conn: asyncpg.Connection) -> dict[str, tuple[str, str, bool]]:
    rows = await conn.fetch("SELECT did, reason, state, again FROM repo_resyncs")
    return {r["did"]: (r["reason"], r["state"], r["again"]) for r in rows}


@pytest.mark.asyncio
async def test_stored_heads_and_requests_in_the_batch_transaction(
    conn: asyncpg.Connection,
) -> None:
    a, b = DIDS[0], DIDS[1]
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    await _admit(conn, screen, [commit(1, a, rev(1), None, None, "d1", (_like(a, "k1", rev(1)),))])
    # A fresh screen (a restart) loads the head the first batch stored.
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    verdict = await _admit(
        conn,
        screen,
        [
            commit(2, a, rev(1), None, None, "d1", (_like(a, "k2", rev(1)),)),  # replay
            commit(3, a, rev(3), rev(2), "d1", "d3"),  # since names a commit never seen
            AccountEvent(4, b, None, False, "deactivated"),
            commit(5, b, rev(1), None),
        ],
    )
    assert verdict.dropped == {0: "rev_not_newer", 3: "account_inactive"}
    assert await _resyncs(conn) == {
        a: ("since_mismatch", "pending", False),
        b: ("account_inactive", "pending", False),
    }
    assert await conn.fetchval("SELECT cursor FROM firehose_cursor") == 5
    assert await conn.fetchval("SELECT count(*) FROM records") == 1  # the replay wrote nothing
    assert await conn.fetchrow("SELECT rev, data_cid FROM actors WHERE did = $1", a) == (
        rev(3),
        "d3",
    )
    # The status loaded from the database: a fresh screen drops b's commits as well.
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids), inactive_recheck_s=0)
    verdict = await _admit(conn, screen, [commit(6, b, rev(2), None)])
    assert verdict.dropped == {0: "account_inactive"}
    assert await load_repo_states(conn, [a, b, DIDS[2]]) == {
        a: RepoState(rev(3), "d3", True),
        b: RepoState(None, None, False),
    }
    # A resync found b served by its PDS and marked it active: the same screen (whose cache
    # holds b inactive) reads it again and takes b's next commit.
    await conn.execute("UPDATE actors SET active = true, status = 'active' WHERE did = $1", b)
    verdict = await _admit(conn, screen, [commit(7, b, rev(3), None)])
    assert verdict.dropped == {}


@pytest.mark.asyncio
async def test_request_dedupe_and_rearm(conn: asyncpg.Connection) -> None:
    a = DIDS[0]

    async def request(cursor: int, *pairs: tuple[str, str]) -> int:
        batch = Batch(resyncs=list(pairs), cursor=cursor)
        return (await apply_batch(conn, batch)).resyncs

    assert await request(1, (a, "since_mismatch"), (a, "sync_event")) == 1  # one row per did
    assert await request(2, (a, "prev_data_mismatch")) == 0  # already pending: kept as is
    assert await _resyncs(conn) == {a: ("since_mismatch", "pending", False)}
    await conn.execute("UPDATE repo_resyncs SET state = 'in_progress', attempts = 2")
    assert await request(3, (a, "sync_event")) == 1  # running: once more afterwards
    assert await _resyncs(conn) == {a: ("since_mismatch", "in_progress", True)}
    await conn.execute("UPDATE repo_resyncs SET state = 'done', again = false, error = 'x'")
    assert await request(4, (a, "sync_event")) == 1  # done: re-armed
    row = await conn.fetchrow("SELECT * FROM repo_resyncs")
    assert (row["state"], row["reason"], row["attempts"], row["error"]) == (
        "pending",
        "sync_event",
        0,
        None,
    )


@pytest.mark.asyncio
async def test_a_backfill_snapshot_head_is_not_a_chain_head(conn: asyncpg.Connection) -> None:
    """A backfill snapshot writes its in-window records at its rev but removes nothing, so its
    head is no point of the chain: live commits older than it must still be applied (here a
    delete of a record the live stream created before the snapshot was written)."""
    a = DIDS[0]
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    await _admit(conn, screen, [commit(1, a, rev(1), None, None, "d1", (_like(a, "k1", rev(1)),))])
    await write_snapshot(conn, [_like(a, "k2", rev(5))], heads=[(a, rev(5), "d5")])
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))  # a restart
    delete = RecordWrite(a, "app.bsky.feed.like", "k1", rev(3), Action.DELETE)
    verdict = await _admit(conn, screen, [commit(2, a, rev(3), rev(1), "d1", "d3", (delete,))])
    assert verdict == Verdict()
    uri = f"at://{a}/app.bsky.feed.like/k1"
    assert await conn.fetchval("SELECT count(*) FROM records WHERE uri = $1", uri) == 0
    assert await conn.fetchval("SELECT rev FROM actors WHERE did = $1", a) == rev(5)  # kept
    assert await load_repo_states(conn, [a]) == {a: RepoState(rev(3), "d3", True)}


@pytest.mark.asyncio
async def test_an_uncommitted_deactivation_does_not_lose_the_chain() -> None:
    """The worker screens slice N+1 while slice N's batch is still being committed. A repo
    deactivated in slice N and reactivated in N+1 must keep the rev slice N gave it, not the
    older one the database still holds (else its next commit is a false since_mismatch)."""
    a = DIDS[0]
    loader = CountingLoader({a: RepoState(rev(1), "d1", True)})  # the committed state
    screen = ChainScreen(loader)
    slice_n: list[Event] = [commit(2, a, rev(2), rev(1), "d1", "d2")]
    slice_n.append(AccountEvent(3, a, None, False, "deactivated"))
    await screen.screen(slice_n, Verdict())
    verdict = Verdict()
    await screen.screen([AccountEvent(4, a, None, True)], verdict)
    await screen.screen([commit(5, a, rev(3), rev(2), "d2", "d3")], verdict)
    assert verdict == Verdict()
    # Once the database says the account is active again (a resync found it served by its
    # PDS), a repo held inactive is let through, with the rev the stream gave it.
    loader.stored[a] = RepoState(rev(1), "d1", True)
    await screen.screen([AccountEvent(6, a, None, False, "deactivated")], Verdict())
    verdict = Verdict()
    await screen.screen([commit(7, a, rev(4), rev(3), "d3", "d4")], verdict)
    assert verdict.dropped == {0: "account_inactive"}  # held inactive: not re-read at once
    rechecking = ChainScreen(loader, inactive_recheck_s=0)
    await rechecking.screen([commit(8, a, rev(4), None)], Verdict())
    await rechecking.screen([AccountEvent(9, a, None, False, "deactivated")], Verdict())
    verdict = Verdict()
    await rechecking.screen([commit(10, a, rev(5), rev(4))], verdict)
    assert verdict == Verdict()  # the database says active: let through, rev(4) kept
    assert rechecking.state(a) == RepoState(rev(5), None, True)
