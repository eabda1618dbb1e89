"""The gate: dropped events move the cursor only, resync requests ride in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from firehose.devnet.dagcbor import cid_for_block
from firehose.live.batch import BatchBuilder
from firehose.live.gate import DROP_REASONS, RESYNC_REASONS, Gate, GateMetrics, Verdict
from firehose.model import Action, CommitEvent, Event, IdentityEvent, RecordWrite

COMMIT = cid_for_block(b"a commit")  # a binary CID (CommitEvent.commit)


def _commit(seq: int, did: str, rkey: str) -> CommitEvent:
    w = RecordWrite(did, "app.bsky.feed.like", rkey, f"rev{seq:04d}", Action.CREATE, "cid", {})
    return CommitEvent(seq, did, f"rev{seq:04d}", None, COMMIT, None, None, (w,))


class DropDid:
    """Drops every commit of one did and asks for its resync; records what it was shown."""

    def __init__(self, did: str) -> None:
        self.did = did
        self.seen_dropped: list[set[int]] = []

    async def screen(self, events: Sequence[Event], verdict: Verdict) -> None:
        self.seen_dropped.append(set(verdict.dropped))
        for i, e in enumerate(events):
            if i not in verdict.dropped and getattr(e, "did", None) == self.did:
                verdict.drop(i, "bad_signature")
                verdict.resync(self.did, "bad_signature")


@pytest.mark.asyncio
async def test_dropped_events_move_the_cursor_and_change_no_rows() -> None:
    registry = CollectorRegistry()
    first, second = DropDid("did:plc:bad"), DropDid("did:plc:other")
    gate = Gate([first, second], GateMetrics.create(registry))
    events: list[Event] = [
        _commit(1, "did:plc:good", "a"),
        _commit(2, "did:plc:bad", "b"),
        IdentityEvent(3, "did:plc:good", None, "good.test"),
        _commit(4, "did:plc:other", "c"),
    ]
    verdict = await gate.screen(events)
    assert verdict.dropped == {1: "bad_signature", 3: "bad_signature"}
    assert second.seen_dropped == [{1}]  # later steps see earlier verdicts
    builder = BatchBuilder()
    for i, e in enumerate(events):
        (builder.skip if i in verdict.dropped else builder.add)(e)
    for did, reason in verdict.resyncs.items():
        builder.request_resync(did, reason)
    batch = builder.take()
    assert batch.cursor == 4 and batch.events == 4
    assert [w.did for w in batch.writes] == ["did:plc:good"]
    assert [h[0] for h in batch.heads] == ["did:plc:good"]
    assert sorted(batch.resyncs) == [
        ("did:plc:bad", "bad_signature"),
        ("did:plc:other", "bad_signature"),
    ]
    dropped = registry.get_sample_value(
        "firehose_events_dropped_total", {"reason": "bad_signature"}
    )
    assert dropped == 2


def test_resyncs_of_other_shards_are_not_requested() -> None:
    builder = BatchBuilder(owns_did=lambda did: did == "did:plc:mine")
    builder.request_resync("did:plc:mine", "sync_event")
    builder.request_resync("did:plc:theirs", "sync_event")
    assert builder.take().resyncs == [("did:plc:mine", "sync_event")]


def test_reasons_are_distinct_and_bounded() -> None:
    assert len(set(DROP_REASONS)) == len(DROP_REASONS) <= 16
    assert len(set(RESYNC_REASONS)) == len(RESYNC_REASONS) <= 16
