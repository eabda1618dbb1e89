"""snapshot_rows.py: a snapshot's records to rows exactly as `prepare.prepare` makes them of
the same records as RecordWrites (no database)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firehose.model import Batch, SnapshotRecord, snapshot_write
from firehose.storage import snapshot_rows as module
from firehose.storage.prepare import ApplyStats, PreparedRows, RepoHead, prepare
from firehose.storage.snapshot_rows import snapshot_rows

DID = "did:plc:snapshotrows"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
COLLECTIONS = ["app.bsky.actor.profile", "app.bsky.feed.like", "app.bsky.feed.post", "x.y.z"]
# Short keys (so that draws collide), a key too long for an index, a NUL, a lone surrogate,
# a non-ASCII one: the storable rule's every branch.
RKEYS = st.one_of(
    st.sampled_from(["3k2a", "3k2b", "3k2c", "self"]),
    st.just("k" * 3000),
    st.sampled_from(["k\x00", "k\ud800", "ké"]),
)
REVS = st.sampled_from(["3k2aaaaaaaaa2", "3k2aaaaaaaab2", "3k2aaaaaaaac2", "", "r\x00"])
RECORDS = st.one_of(
    st.just(None),
    st.just([1]),
    st.fixed_dictionaries(
        {"createdAt": st.sampled_from(["2024-01-02T03:04:05Z", "nope"])},
        optional={"subject": st.just({"uri": "at://did:plc:b/app.bsky.feed.post/1", "cid": CID})},
    ),
)
ITEM = st.tuples(
    st.sampled_from(COLLECTIONS),
    RKEYS,
    REVS,
    st.sampled_from([CID, None, "c\x00"]),
    RECORDS,
    st.booleans(),
)
HEADS = st.sampled_from(
    [None, [], [(DID, "3k2aaaaaaaab2", "bafydata")], [("did:plc:other", "3k2a", None)]]
)


def generic(
    records: list[SnapshotRecord], heads: list[RepoHead] | None
) -> tuple[PreparedRows, ApplyStats]:
    stats = ApplyStats()
    writes = [snapshot_write(DID, r) for r in records]
    return prepare(Batch(writes=writes), stats, heads), stats


def in_walk_order(items: list[Any]) -> list[Any]:
    """One record per key, in key order: what an MST walk yields."""
    by_key = {f"{c}/{k}": (c, k, *rest) for c, k, *rest in items}
    return [by_key[key] for key in sorted(by_key)]


@settings(max_examples=300, deadline=None)
@given(st.lists(ITEM, max_size=12), st.booleans(), HEADS)
def test_the_same_as_the_writers_steps(items: list[Any], walked: bool, heads: Any) -> None:
    """Property: the rows, their order, the heads, the claims and every count are
    `prepare.prepare`'s, for records in a walk's order (the direct steps) or in any other
    (duplicated keys, out of order: the generic steps)."""
    records = in_walk_order(items) if walked else items
    stats = ApplyStats()
    rows = snapshot_rows(DID, records, heads, stats)
    assert (rows, stats) == generic(records, heads)


def test_a_walks_order_builds_no_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records in strictly increasing key order never reach the generic steps (which the
    property above would not notice: it compares with them)."""

    def refuse(*args: Any) -> Any:
        raise AssertionError("the generic steps were taken")

    monkeypatch.setattr(module, "prepare", refuse)
    record = {"createdAt": "2024-01-02T03:04:05Z", "text": "hi"}
    records: list[SnapshotRecord] = [
        ("app.bsky.feed.post", rkey, "3k2aaaaaaaaa2", CID, record, False)
        for rkey in ("3k2a", "3k2b", "3k2c")
    ]
    stats = ApplyStats()
    rows = snapshot_rows(DID, records, [(DID, "3k2aaaaaaaaa2", "bafydata")], stats)
    assert [r[0] for r in rows.records] == [f"at://{DID}/app.bsky.feed.post/3k2{c}" for c in "abc"]
    assert len(rows.typed["posts"]) == 3 and rows.claims == [DID]
    assert (stats.writes, stats.invalid, stats.duplicates) == (3, 0, 0)
    with pytest.raises(AssertionError, match="generic"):
        snapshot_rows(DID, [records[1], records[0]], None, ApplyStats())
