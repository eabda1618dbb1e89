"""indigo's relay test scenarios (tests/fixtures/indigo/cmd/relay/testing/testdata, captured
frames with the relay's expected outcome per message) through the decoder, the chain checks
and the writer, against a real PostgreSQL.

A message expected `drop` must not change any row (rejected by the decoder, or dropped by the
chain checks); a message expected `update` must change the account's stored state; every other
message is applied. Beyond the relay's outcomes, each scenario also states which repos the
chain checks queue for a resync (EXPECTED_RESYNCS): a relay only passes events on, an indexer
must also notice what it missed.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from test_protocol_support import FIXTURES, frame

from firehose.live.batch import BatchBuilder
from firehose.live.chain import ChainScreen, load_repo_states
from firehose.live.gate import Verdict
from firehose.model import AccountEvent, CommitEvent, Event
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.storage.writer import apply_batch

SCENARIOS = FIXTURES / "indigo/cmd/relay/testing/testdata"
BNEWBOLD = "did:plc:44ybard66vv44zksje25o7dz"
EXPECTED_RESYNCS = {
    "account_lifecycle": {"did:plc:vvpy7d6y2li5yo73cgbszibl": "sync_event"},
    # The commit dropped while deactivated queues one (the first reason is kept); the commit
    # after the reactivation names it in `since`, a mismatch too.
    "deactivation": {BNEWBOLD: "account_inactive"},
    "legacy": {},
    "post_lifecycle": {},  # prevData and since chain all the way
    # A capture with gaps in seq: the second commit's since is not the first one's rev.
    "post_lifecycle_legacy": {BNEWBOLD: "since_mismatch"},
    "rev_ordering": {},
}
# seq_ordering's drops are about seq numbers going backwards, which is the relay's own
# sequencing (our relay client counts it as a seq anomaly); tested apart below.
NAMES = sorted(EXPECTED_RESYNCS)


def _scenario(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCENARIOS / f"{name}.json").read_text())
    return data


async def _state(conn: asyncpg.Connection) -> tuple[Any, ...]:
    records = await conn.fetch("SELECT uri, cid, rev FROM records ORDER BY uri")
    actors = await conn.fetch("SELECT did, status, active, rev, data_cid FROM actors ORDER BY did")
    tombstones = await conn.fetch("SELECT uri, rev FROM record_tombstones ORDER BY uri")
    return tuple(map(tuple, records)), tuple(map(tuple, actors)), tuple(map(tuple, tombstones))


async def _apply_one(
    conn: asyncpg.Connection, screen: ChainScreen, event: Event
) -> tuple[Verdict, int]:
    verdict = Verdict()
    await screen.screen([event], verdict)
    builder = BatchBuilder()
    (builder.skip if 0 in verdict.dropped else builder.add)(event)
    for did, reason in verdict.resyncs.items():
        builder.request_resync(did, reason)
    batch = builder.take()
    stats = await apply_batch(conn, batch, heads=batch.heads)
    return verdict, stats.upserted + stats.deleted


@pytest.mark.asyncio
@pytest.mark.parametrize("name", NAMES)
async def test_relay_scenario_outcomes(conn: asyncpg.Connection, name: str) -> None:
    scenario = _scenario(name)
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    for n, message in enumerate(scenario["messages"]):
        data = frame(message["frame"]["header"], message["frame"]["body"])
        before = await _state(conn)
        try:
            event = decode_frame(data)
        except ProtocolError:
            assert message["drop"], f"message {n} rejected by the decoder"
            continue
        verdict, _ = await _apply_one(conn, screen, event)
        after = await _state(conn)
        if message["drop"]:
            assert 0 in verdict.dropped, f"message {n} should be dropped"
            assert after == before, f"dropped message {n} changed rows"
            continue
        assert 0 not in verdict.dropped, (n, verdict.dropped)
        if message.get("update"):
            assert isinstance(event, AccountEvent)
            assert after[1] != before[1], f"message {n}: the account state did not change"
            row = await conn.fetchrow("SELECT status, active FROM actors WHERE did = $1", event.did)
            assert (row["status"], row["active"]) == (event.effective_status, event.active)
        if isinstance(event, CommitEvent):
            head = await conn.fetchrow("SELECT rev, data_cid FROM actors WHERE did = $1", event.did)
            assert (head["rev"], head["data_cid"]) == (event.rev, event.data_cid)
    rows = await conn.fetch("SELECT did, reason FROM repo_resyncs")
    assert {r["did"]: r["reason"] for r in rows} == EXPECTED_RESYNCS[name]


@pytest.mark.asyncio
async def test_rev_ordering_replays_are_dropped_without_writing(conn: asyncpg.Connection) -> None:
    """The relay's rev_ordering drops come as malformed frames; a genuine replay of a valid
    commit (same rev, or an older one after a newer) is dropped by the chain checks."""
    messages = _scenario("rev_ordering")["messages"]
    first, last = (frame(m["frame"]["header"], m["frame"]["body"]) for m in messages[::3])
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    verdict, written = await _apply_one(conn, screen, decode_frame(first))
    assert verdict.dropped == {} and written > 0
    for data, expect in ((first, "rev_not_newer"), (last, None), (first, "rev_not_newer")):
        before = await _state(conn)
        verdict, written = await _apply_one(conn, screen, decode_frame(data))
        if expect is None:
            assert verdict.dropped == {} and verdict.resyncs == {}
        else:
            assert verdict.dropped == {0: expect} and written == 0
            assert await _state(conn) == before


@pytest.mark.asyncio
async def test_seq_ordering_applies_the_commit_once(conn: asyncpg.Connection) -> None:
    """seq_ordering sends one commit twice (seq 5 after seq 1000, then as seq 2000). The relay
    drops the first by seq; the chain checks, judging by rev, keep the first copy and drop the
    second as rev_not_newer: either way its rows are written once."""
    screen = ChainScreen(lambda dids: load_repo_states(conn, dids))
    commits = []
    for message in _scenario("seq_ordering")["messages"]:
        event = decode_frame(frame(message["frame"]["header"], message["frame"]["body"]))
        verdict, _ = await _apply_one(conn, screen, event)
        if isinstance(event, CommitEvent):
            commits.append(verdict.dropped.get(0))
    assert commits == [None, "rev_not_newer"]
    assert await conn.fetchval("SELECT count(*) FROM repo_resyncs") == 0
