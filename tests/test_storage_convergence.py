"""Invariant 2 as a property: any interleaving, batching, order and replay of record ops
converges to the op with the highest rev per uri (present with its cid, absent if a delete),
in `records` and in the typed tables alike."""

from __future__ import annotations

from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firehose.devnet.tid import tid_of_value as tid
from firehose.model import Action, Batch, RecordWrite
from firehose.storage.writer import apply_batch

DID = "did:plc:conv"
# (collection, rkey, typed table): a few uris over two typed tables.
URIS = [
    ("app.bsky.feed.post", "3kaaa", "posts"),
    ("app.bsky.feed.post", "3kbbb", "posts"),
    ("app.bsky.feed.like", "3kccc", "likes"),
    ("app.bsky.feed.like", "3kddd", "likes"),
]
TABLES = "records, posts, likes, record_tombstones, actors"


def make_write(uri_index: int, action: Action, rev: int) -> RecordWrite:
    collection, rkey, _ = URIS[uri_index]
    if action is Action.DELETE:
        return RecordWrite(DID, collection, rkey, tid(rev), action)
    record: dict[str, Any] = {"$type": collection, "createdAt": "2024-01-01T00:00:00Z"}
    if collection == "app.bsky.feed.post":
        record["text"] = f"rev {rev}"
    else:
        record["subject"] = {"uri": f"at://did:plc:x/app.bsky.feed.post/{rev}", "cid": "bafys"}
    return RecordWrite(DID, collection, rkey, tid(rev), action, f"bafy{rev}", record)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[RecordWrite], list[list[RecordWrite]]]:
    n = draw(st.integers(min_value=1, max_value=14))
    # Distinct revs (TIDs), assigned to ops in a random order: the list order is the order the
    # ops are seen, unrelated to their revs.
    revs = draw(st.lists(st.integers(1, 2**40), min_size=n, max_size=n, unique=True))
    ops = [
        make_write(
            draw(st.integers(0, len(URIS) - 1)),
            draw(st.sampled_from([Action.CREATE, Action.UPDATE, Action.DELETE])),
            rev,
        )
        for rev in revs
    ]
    # Split into batches at random points ...
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n)))
    batches = [ops[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True) if ops[a:b]]
    # ... replay some of them (duplicates) ...
    replays = draw(st.lists(st.sampled_from(batches), max_size=3))
    # ... and apply everything in a random order.
    order = draw(st.permutations(batches + replays))
    return ops, list(order)


def expected_state(ops: list[RecordWrite]) -> dict[str, str]:
    """uri -> cid of the op with the highest rev, for uris whose last op is not a delete."""
    best: dict[str, RecordWrite] = {}
    for op in ops:
        if op.uri not in best or best[op.uri].rev < op.rev:
            best[op.uri] = op
    return {uri: op.cid for uri, op in best.items() if op.action is not Action.DELETE and op.cid}


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
async def test_any_order_converges(
    conn: asyncpg.Connection, scenario: tuple[list[RecordWrite], list[list[RecordWrite]]]
) -> None:
    ops, batches = scenario
    await conn.execute(f"TRUNCATE {TABLES}")  # one database for all examples
    for i, batch in enumerate(batches):
        await apply_batch(conn, Batch(writes=list(batch), cursor=i))

    want = expected_state(ops)
    got = {r["uri"]: r["cid"] for r in await conn.fetch("SELECT uri, cid FROM records")}
    assert got == want
    typed: dict[str, str] = {}
    for table in ("posts", "likes"):  # constants
        typed.update(
            {r["uri"]: r["cid"] for r in await conn.fetch(f"SELECT uri, cid FROM {table}")}
        )
    assert typed == want
    # The stored rev is the winning op's rev.
    for r in await conn.fetch("SELECT uri, rev FROM records"):
        assert r["rev"] == max(op.rev for op in ops if op.uri == r["uri"])
