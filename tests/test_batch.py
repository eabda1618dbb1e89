"""Batching keeps firehose order and carries the cursor of its last event."""

from __future__ import annotations

from datetime import UTC, datetime

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

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def commit(seq: int, did: str, *collections: str) -> CommitEvent:
    writes = tuple(
        RecordWrite(did, c, f"3k{seq}{i}", "3kaaaaaaaaaa2", Action.CREATE, "bafy", {})
        for i, c in enumerate(collections)
    )
    return CommitEvent(seq, did, "3kaaaaaaaaaa2", None, "bafyc", None, T0, writes)


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
