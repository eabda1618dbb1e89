"""A sharded worker decodes in full only its own shard's events (decode_frame's owns_did).

Every other repo event is read as far as its seq and time (`OtherShardEvent`), so across N
shards each event is decoded once, not N times; its owner decodes and checks it exactly as
an unsharded worker would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_support import commit_bodies, frame, relay_frames

from firehose.live.batch import shard_filter, shard_of
from firehose.model import (
    AccountEvent,
    CommitEvent,
    Event,
    IdentityEvent,
    OtherShardEvent,
    SyncEvent,
)
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.settings import WorkerSettings

SHARDS = 3
REPO_EVENTS = (CommitEvent, SyncEvent, IdentityEvent, AccountEvent)


def _filters(count: int) -> list[Callable[[str], bool]]:
    filters = [shard_filter(WorkerSettings(i, count)) for i in range(count)]
    assert all(f is not None for f in filters)
    return filters  # type: ignore[return-value]


def _decoded(data: bytes, owns_did: Callable[[str], bool] | None = None) -> Event | str:
    try:
        return decode_frame(data, owns_did=owns_did)
    except ProtocolError as err:
        return f"error:{err.reason}"


def _frames() -> list[bytes]:
    commits = [frame({"op": 1, "t": "#commit"}, body) for _, body in commit_bodies()]
    return relay_frames() + commits


def test_each_repo_event_is_decoded_in_full_by_its_shard_only() -> None:
    frames = _frames()
    filters = _filters(SHARDS)
    seen = set()
    for data in frames:
        full = _decoded(data)
        got = [_decoded(data, owns) for owns in filters]
        if isinstance(full, REPO_EVENTS):
            owner = shard_of(full.did, SHARDS)
            seen.add(owner)
            for i, event in enumerate(got):
                if i == owner:
                    assert event == full
                else:
                    assert event == OtherShardEvent(full.seq, type(full).__name__, full.time)
        elif not isinstance(full, str):
            assert got == [full] * SHARDS  # #info, errors, unknown types: every shard reads them
    assert seen == set(range(SHARDS)), "the fixtures should reach every shard"


def _commit_body() -> dict[str, Any]:
    return copy.deepcopy(commit_bodies()[0][1])


def _owner_and_other(did: str) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    filters = _filters(SHARDS)
    owner = shard_of(did, SHARDS)
    return filters[owner], filters[(owner + 1) % SHARDS]


def test_another_shards_commit_is_not_parsed_its_owner_still_refuses_it() -> None:
    body = _commit_body()
    body["blocks"] = {"$bytes": "AAAA"}  # not a CAR at all
    data = frame({"op": 1, "t": "#commit"}, body)
    owner, other = _owner_and_other(body["repo"])
    assert _decoded(data, owner) == _decoded(data) == "error:car"
    event = decode_frame(data, owns_did=other)
    assert isinstance(event, OtherShardEvent)
    assert (event.seq, event.event_type) == (body["seq"], "CommitEvent")
    assert event.time == body["time"]  # as sent: a batch parses its last one


@pytest.mark.parametrize("seq", ["12", 2**63, -1])
def test_another_shards_event_still_needs_a_bigint_seq(seq: object) -> None:
    body = _commit_body()
    body["seq"] = seq
    data = frame({"op": 1, "t": "#commit"}, body)
    owner, other = _owner_and_other(body["repo"])
    assert _decoded(data, other) == _decoded(data, owner) == "error:body"


@pytest.mark.parametrize("repo", [None, 42, b"did:plc:abc"])
def test_a_repo_field_that_is_not_a_string_is_left_to_the_full_decoder(repo: object) -> None:
    body = _commit_body()
    body["repo"] = repo
    data = frame({"op": 1, "t": "#commit"}, body)
    for owns in _filters(SHARDS):
        assert _decoded(data, owns) == _decoded(data) == "error:body"


_DID_CHARS = "abcdefghijklmnopqrstuvwxyz234567"


@given(
    did_suffix=st.text(_DID_CHARS, min_size=24, max_size=24),
    count=st.integers(min_value=1, max_value=6),
    kind=st.sampled_from(["#identity", "#account", "#handle", "#tombstone"]),
)
def test_exactly_one_shard_decodes_any_did_in_full(did_suffix: str, count: int, kind: str) -> None:
    did = f"did:plc:{did_suffix}"
    body: dict[str, Any] = {"seq": 7, "did": did, "time": "2024-05-01T12:00:00.000Z"}
    if kind == "#account":
        body["active"] = True
    if kind == "#handle":
        body["handle"] = "alice.example.com"
    data = frame({"op": 1, "t": kind}, body)
    full = decode_frame(data)
    filters = [shard_filter(WorkerSettings(i, count)) for i in range(count)]
    got = [decode_frame(data, owns_did=owns) for owns in filters]
    assert sum(event == full for event in got) == 1
    assert all(
        event == full or event == OtherShardEvent(7, type(full).__name__, full.time)  # type: ignore[union-attr]
        for event in got
    )
