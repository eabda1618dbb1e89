"""Batching keeps firehose order and carries the cursor of its last event."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from firehose.devnet.dagcbor import cid_for_block
from firehose.live.batch import BatchBuilder, shard_filter, shard_of
from firehose.model import (
    AccountEvent,
    Action,
    CommitEvent,
    IdentityEvent,
    IgnoredEvent,
    InfoEvent,
    RecordWrite,
)
from firehose.settings import WorkerSettings

COMMIT = cid_for_block(b"a commit")  # a binary CID (CommitEvent.commit)
T0 = "2026-01-01T00:00:00.000Z"  # an event's time, as the frame sends it


def commit(seq: int, did: str, *collections: str) -> CommitEvent:
    writes = tuple(
        RecordWrite(did, c, f"3k{seq}{i}", "3kaaaaaaaaaa2", Action.CREATE, "bafy", {})
        for i, c in enumerate(collections)
    )
    return CommitEvent(seq, did, "3kaaaaaaaaaa2", None, COMMIT, None, T0, writes)


def test_order_and_cursor() -> None:
    b = BatchBuilder()
    b.add(commit(1, "did:plc:a", "app.bsky.feed.post"))
    b.add(InfoEvent("OutdatedCursor"))
    b.add(IdentityEvent(2, "did:plc:a", T0, "a.test"))
    b.add(commit(3, "did:plc:b", "app.bsky.feed.like", "app.bsky.feed.post"))
    b.add(AccountEvent(4, "did:plc:b", T0, active=False, status="takendown"))
    b.add(IgnoredEvent(5, "#migrate"))
    assert len(b) == 5
    batch = b.take()
    assert batch.cursor == 5
    assert [w.did for w in batch.writes] == ["did:plc:a", "did:plc:b", "did:plc:b"]
    assert [w.collection for w in batch.writes][1:] == ["app.bsky.feed.like", "app.bsky.feed.post"]
    assert len(batch.identities) == 1 and len(batch.accounts) == 1
    assert len(b) == 0 and b.take().cursor is None


def test_last_event_time_is_the_last_valid_one_parsed() -> None:
    b = BatchBuilder()
    b.add(IdentityEvent(1, "did:plc:a", "2026-01-01T00:00:01.000Z", "a.test"))
    b.add(commit(2, "did:plc:a", "app.bsky.feed.post"))  # T0
    b.skip(AccountEvent(3, "did:plc:a", "2026-13-01T00:00:00Z", active=True))  # no such month
    b.add(IgnoredEvent(4, "#migrate"))  # no time
    assert b.take().last_event_time == datetime(2026, 1, 1, tzinfo=UTC)
    # A batch with no valid time leaves it unknown (the cursor row keeps the stored one);
    # the texts of the batch before do not leak into the next one.
    b.add(IdentityEvent(5, "did:plc:a", "yesterday", "a.test"))
    assert b.take().last_event_time is None
    b.add(IdentityEvent(6, "did:plc:a", "2026-01-01T00:00:02+02:00", "a.test"))
    assert b.take().last_event_time == datetime(2025, 12, 31, 22, 0, 2, tzinfo=UTC)


def test_wanted_collections_filter_but_cursor_moves() -> None:
    b = BatchBuilder(("app.bsky.feed.post",))
    b.add(commit(7, "did:plc:a", "app.bsky.feed.like", "app.bsky.feed.post"))
    b.add(commit(8, "did:plc:a", "app.bsky.feed.like"))
    batch = b.take()
    assert [w.collection for w in batch.writes] == ["app.bsky.feed.post"]
    assert batch.cursor == 8


def test_shards_partition_dids() -> None:
    dids = [f"did:plc:{i:024d}" for i in range(300)]
    owners = [shard_of(d, 3) for d in dids]
    assert set(owners) == {0, 1, 2}
    assert shard_of(dids[0], 3) == shard_of(dids[0], 3)
    filters = [shard_filter(WorkerSettings(i, 3)) for i in range(3)]
    for d in dids:
        assert sum(1 for f in filters if f is not None and f(d)) == 1
    assert shard_filter(WorkerSettings(0, 1)) is None


@given(
    dids=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60),
    count=st.integers(min_value=2, max_value=5),
    cache_max=st.integers(min_value=1, max_value=8),
)
def test_shard_filter_answers_as_shard_of_through_its_bounded_cache(
    dids: list[str], count: int, cache_max: int
) -> None:
    """The memo never changes an answer, whether hit, missed or just cleared."""
    filters = [shard_filter(WorkerSettings(i, count), cache_max) for i in range(count)]
    for did in dids + dids[::-1] + [did + "x" * 2048 for did in dids[:3]]:
        answers = [f(did) for f in filters if f is not None]
        assert answers == [shard_of(did, count) == i for i in range(count)]


def test_shard_filter_covers_every_event_kind_and_cursor_moves() -> None:
    """A worker keeps commits (records + head), #identity and #account of its shard only,
    and its cursor still covers the other shards' events."""
    dids = [f"did:plc:{i:024d}" for i in range(12)]
    mine = [d for d in dids if shard_of(d, 3) == 1]
    assert mine
    builders = [BatchBuilder((), shard_filter(WorkerSettings(i, 3))) for i in range(3)]
    seq = 0
    for did in dids:
        for event in (
            commit(seq + 1, did, "app.bsky.feed.post"),
            IdentityEvent(seq + 2, did, T0, "h.test"),
            AccountEvent(seq + 3, did, T0, active=False, status="deleted"),
        ):
            for b in builders:
                b.add(event)
        seq += 3
    batches = [b.take() for b in builders]
    assert all(batch.cursor == seq and batch.events == seq for batch in batches)
    one = batches[1]
    assert sorted({w.did for w in one.writes}) == mine
    assert sorted(h[0] for h in one.heads) == mine
    assert sorted(e.did for e in one.identities) == mine
    assert sorted(e.did for e in one.accounts) == mine
    # Together the shards hold every event exactly once.
    assert sorted(e.did for b in batches for e in b.accounts) == sorted(dids)
    assert sum(len(b.heads) for b in batches) == len(dids)
