"""Data hygiene (issue 5, point 5): every kind of bad data has ONE rule, and no bad record
can make a batch fail (a failed batch is retried for ever: the stream would stall).

The end-to-end test builds real `#commit` frames with the devnet's encoder (cbor2, not the
worker's decoder), serves them from a real websocket relay, runs the real worker process
against a real PostgreSQL, then reads what is stored and what `/metrics` counted. The
"Data hygiene" table of docs/hygiene.md states the rules this file checks.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from support import follow_until, serve_frames

from firehose.devnet.dagcbor import (
    cid_for_block,
    cid_str,
    encode,
    encode_commit,
    link,
    write_car,
)
from firehose.model import AccountEvent, CommitEvent, IdentityEvent
from firehose.protocol.car import MAX_BLOCK_BYTES
from firehose.protocol.cbor import MAX_RECORD_DEPTH, decode_record
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.protocol.syntax import make_tid, parse_datetime
from firehose.storage.rows import MAX_ARRAY_ITEMS, created_at_of

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
FOLLOW = "app.bsky.graph.follow"
REPOST = "app.bsky.feed.repost"
BLOCK = "app.bsky.graph.block"
GENERATOR = "app.bsky.feed.generator"
PROFILE = "app.bsky.actor.profile"
LISTITEM = "app.bsky.graph.listitem"
CREATED = "2024-05-01T12:00:00.000Z"
LONG = "at://did:plc:" + "x" * 3000  # an "identifier" no btree entry can hold

# --- frames, built with the devnet's encoder ----------------------------------------------


def did_of(name: str) -> str:
    return "did:plc:" + name.ljust(24, "z")


def post(text: Any = "hello", **fields: Any) -> dict[str, Any]:
    return {"$type": POST, "text": text, "createdAt": CREATED, **fields}


def block(record: dict[str, Any]) -> bytes:
    return encode(record)


def commit_frame(seq: int, did: str, ops: list[tuple[str, bytes]]) -> bytes:
    """A `#commit` of create ops `(path, record block)`; the CAR holds every block."""
    rev = make_tid(1_700_000_000_000_000 + seq)
    data_cid = cid_for_block(encode({"e": [], "l": None}))
    commit = encode_commit(did, rev, data_cid, 3, b"\x01" * 64)
    commit_cid = cid_for_block(commit)
    blocks = [(commit_cid, commit)] + [(cid_for_block(b), b) for _, b in ops]
    body = {
        "seq": seq,
        "rebase": False,
        "tooBig": False,
        "repo": did,
        "commit": link(commit_cid),
        "rev": rev,
        "since": None,
        "blocks": write_car(commit_cid, blocks),
        "ops": [
            {"action": "create", "path": path, "cid": link(cid_for_block(b))} for path, b in ops
        ],
        "blobs": [],
        "time": CREATED,
    }
    return encode({"op": 1, "t": "#commit"}) + encode(body)


def event_frame(kind: str, body: dict[str, Any]) -> bytes:
    return encode({"op": 1, "t": kind}) + encode(body)


def with_bytes(record: dict[str, Any], placeholder: bytes, raw: bytes) -> bytes:
    """The record's block with `placeholder` (inside a text string) swapped for `raw` bytes of
    the same length: how a lone surrogate or invalid UTF-8 gets into a CBOR text string
    (no Python encoder writes one)."""
    data = block(record)
    assert len(raw) == len(placeholder) and data.count(placeholder) == 1
    return data.replace(placeholder, raw)


def nested(depth: int) -> dict[str, Any]:
    """A record whose maps nest `depth` levels in all (the record itself is level 1)."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = {"n": value}
    return {"$type": POST, "createdAt": CREATED, "n": value}


# createdAt -> expected created_at (None: NULL, the record is still stored)
DATETIMES: dict[str, datetime | None] = {
    "2024-05-01T12:00:00Z": datetime(2024, 5, 1, 12, tzinfo=UTC),
    "2024-05-01T12:00:00.123456789Z": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
    "2024-05-01T12:00:00+14:00": datetime(2024, 4, 30, 22, tzinfo=UTC),
    "2024-05-01T12:00:00-23:59": datetime(2024, 5, 2, 11, 59, tzinfo=UTC),
    "0001-01-01T00:00:00Z": datetime(1, 1, 1, tzinfo=UTC),
    "9999-12-31T23:59:59.999999Z": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    "2024-02-30T00:00:00Z": None,  # impossible date
    "2023-02-29T00:00:00Z": None,  # not a leap year
    "0000-01-01T00:00:00Z": None,  # year 0: valid RFC 3339, no Python/ISO 8601 proleptic value
    "10000-01-01T00:00:00Z": None,  # five-digit year
    "2024-01-01T24:00:00Z": None,  # 24:00
    "2016-12-31T23:59:60Z": None,  # leap second: neither Python nor PostgreSQL hold it
    "0001-01-01T00:00:00+14:00": None,  # year 0 once in UTC
    "9999-12-31T23:59:59-14:00": None,  # year 10000 once in UTC
    "2024-05-01T12:00:00+24:00": None,  # offset out of range
    "2024-05-01T12:00:00+00:60": None,  # offset minutes out of range
    "2024-05-01T12:00:00": None,  # no timezone
    "2024-05-01 12:00:00Z": None,  # no T
    "2024-05-01t12:00:00z": None,  # lower case
    "2024-05-01T12:00Z": None,  # no seconds
    "\u0662\u0660\u0662\u0664-05-01T12:00:00Z": None,  # Arabic-Indic digits
    "2024-05-01T12:00:00." + "9" * 21 + "Z": None,  # absurd precision
    "yesterday": None,
    "": None,
}


def hostile_frames() -> tuple[list[bytes], dict[str, Any]]:
    """The frames, and what the test expects to find (by name)."""
    frames: list[bytes] = []
    seq = 0

    def add(frame: bytes) -> int:
        nonlocal seq
        frames.append(frame)
        return seq

    def commit(did: str, ops: list[tuple[str, bytes]]) -> None:
        nonlocal seq
        seq += 1
        add(commit_frame(seq, did, ops))

    # 1. NUL in a string and in a key: replaced by U+FFFD, kept, counted as sanitized.
    commit(
        did_of("nul"),
        [(f"{POST}/3kaaaaaaaaaa2", block(post("a\x00b", **{"k\x00y": "v\x00"})))],
    )
    # 2. Lone surrogate (CESU-8 ED A0 80) in a text string, invalid UTF-8 (FF) in a key:
    #    each op invalid (reason cbor), the good op of the same commit kept.
    commit(
        did_of("utf8"),
        [
            (f"{POST}/3kaaaaaaaaaa2", with_bytes(post("ABCD"), b"dABCD", b"d\xed\xa0\x80A")),
            (
                f"{POST}/3kaaaaaaaaaa3",
                with_bytes(post("ok", m={"KEYX": 1}), b"dKEYX", b"d\xffEYX"),
            ),
            (f"{POST}/3kaaaaaaaaaa4", block(post("fine"))),
        ],
    )
    # 3. JSON escapes as text: a literal backslash-u-d800 / backslash-u-0000 is just text.
    commit(did_of("escape"), [(f"{POST}/3kaaaaaaaaaa2", block(post("\\ud800 \\u0000 \\\\")))])
    # 4. Size cap: a record block over MAX_BLOCK_BYTES refuses its frame (too_large); one just
    #    under it is stored whole.
    commit(did_of("huge"), [(f"{POST}/3kaaaaaaaaaa2", block(post("x" * MAX_BLOCK_BYTES)))])
    commit(did_of("big"), [(f"{POST}/3kaaaaaaaaaa2", block(post("y" * (MAX_BLOCK_BYTES - 200))))])
    # 5. Nesting: MAX_RECORD_DEPTH levels are stored, one more is an invalid op (cbor).
    commit(
        did_of("deep"),
        [
            (f"{POST}/3kaaaaaaaaaa2", block(nested(MAX_RECORD_DEPTH))),
            (f"{POST}/3kaaaaaaaaaa3", block(nested(MAX_RECORD_DEPTH + 1))),
        ],
    )
    # 6. createdAt: every value of DATETIMES, one post each, all in one commit.
    commit(
        did_of("dates"),
        [
            (f"{POST}/d{i}", block({"$type": POST, "text": str(i), "createdAt": value}))
            for i, value in enumerate(DATETIMES)
        ],
    )
    # 7. Oversized identifiers in indexed columns: NULL, the record kept; the longest valid
    #    path (a 512-char record key) is stored.
    long_nsid = "com." + "a" * 60 + "." + "b" * 60 + ".record"
    commit(
        did_of("idents"),
        [
            (
                f"{LIKE}/3kaaaaaaaaaa2",
                block({"$type": LIKE, "subject": {"uri": LONG, "cid": LONG}, "createdAt": CREATED}),
            ),
            (
                f"{FOLLOW}/3kaaaaaaaaaa2",
                block({"$type": FOLLOW, "subject": LONG, "createdAt": CREATED}),
            ),
            (
                f"{REPOST}/3kaaaaaaaaaa2",
                block(
                    {"$type": REPOST, "subject": {"uri": LONG, "cid": "x"}, "createdAt": CREATED}
                ),
            ),
            (
                f"{BLOCK}/3kaaaaaaaaaa2",
                block({"$type": BLOCK, "subject": "d" * 2500, "createdAt": CREATED}),
            ),
            (
                f"{GENERATOR}/3kaaaaaaaaaa2",
                block({"$type": GENERATOR, "did": LONG, "createdAt": CREATED}),
            ),
            (
                f"{PROFILE}/self",
                block({"$type": PROFILE, "avatar": {"$type": "blob", "ref": {"$link": LONG}}}),
            ),
            (
                f"{LISTITEM}/3kaaaaaaaaaa2",
                block({"$type": LISTITEM, "list": LONG, "subject": LONG, "createdAt": CREATED}),
            ),
            (
                f"{POST}/3kaaaaaaaaaa2",
                block(
                    post(
                        "reply",
                        reply={"root": {"uri": LONG}, "parent": {"uri": LONG}},
                        tags=[LONG, "ok"],
                    )
                ),
            ),
            (f"{long_nsid}/{'k' * 512}", block({"$type": long_nsid, "v": 1})),
        ],
    )
    # 8. A DID so long that its AT-URI cannot be a primary key: the write is skipped, the
    #    batch commits.
    commit("did:web:" + "w" * 1200, [(f"{POST}/3kaaaaaaaaaa2", block(post("too long a uri")))])
    # 9. $type that is not the collection, and fields of the wrong type: stored under the
    #    collection of its path, wrong-typed columns NULL.
    commit(
        did_of("types"),
        [
            (f"{LIKE}/3kaaaaaaaaaa2", block(post("I am a post in the likes"))),
            (
                f"{POST}/3kaaaaaaaaaa2",
                block(
                    {
                        "$type": POST,
                        "text": 42,
                        "langs": "en",
                        "reply": "x",
                        "facets": {"a": 1},
                        "createdAt": 7,
                    }
                ),
            ),
            (f"{FOLLOW}/3kaaaaaaaaaa2", block({"$type": FOLLOW, "subject": {"did": "x"}})),
        ],
    )
    # 10. Huge arrays: only MAX_ARRAY_ITEMS items of each go into the typed columns.
    mention = "app.bsky.richtext.facet#mention"
    facets = [
        {
            "features": [{"$type": mention, "did": f"did:plc:m{i}"}],
            "index": {"byteStart": 0, "byteEnd": 1},
        }
        for i in range(1000)
    ]
    commit(
        did_of("arrays"),
        [
            (
                f"{POST}/3kaaaaaaaaaa2",
                block(
                    post(
                        "many",
                        langs=[f"l{i}" for i in range(5000)],
                        tags=[f"t{i}" for i in range(5000)],
                        facets=facets,
                    )
                ),
            )
        ],
    )
    # 11. Integers at the DAG-CBOR limits (beyond int64), kept exactly in jsonb.
    commit(
        did_of("ints"), [(f"{POST}/3kaaaaaaaaaa2", block(post("n", big=2**64 - 1, small=-(2**64))))]
    )
    # 12. #identity / #account with NUL and oversized handle / status: the batch commits.
    seq += 1
    add(
        event_frame(
            "#identity",
            {"seq": seq, "did": did_of("acct"), "handle": "bad\x00handle.test", "time": CREATED},
        )
    )
    seq += 1
    add(
        event_frame(
            "#account",
            {
                "seq": seq,
                "did": did_of("acct"),
                "active": False,
                "status": "x\x00" + "s" * 5000,
                "time": CREATED,
            },
        )
    )
    seq += 1
    add(
        event_frame(
            "#identity",
            {"seq": seq, "did": did_of("acct2"), "handle": "h" * 100_000, "time": CREATED},
        )
    )
    # 13. A last plain post: the cursor reaching it proves every batch before it committed.
    commit(did_of("last"), [(f"{POST}/3kaaaaaaaaaa2", block(post("the end")))])
    return frames, {"last_seq": seq, "long_nsid": long_nsid}


# --- a real websocket relay serving those frames ------------------------------------------


@pytest_asyncio.fixture
async def hostile_relay() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    frames, expected = hostile_frames()
    async with serve_frames(frames) as url:
        yield url, expected


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_hostile_records_end_to_end(
    hostile_relay: tuple[str, dict[str, Any]], db_dsn: str, tmp_path: Path
) -> None:
    url, expected = hostile_relay
    log, text = await follow_until(
        tmp_path,
        db_dsn,
        url,
        expected["last_seq"],
        BATCH_MAX_EVENTS="3",
        BACKFILL_DAYS="0",
        VERIFY_SIGNATURES="false",  # unsigned test commits: signatures are another test's
    )
    # Every batch committed the first time: no batch failed and was retried.
    assert "batch commit failed" not in log, log[-3000:]
    assert metric(text, "firehose_db_errors_total") == 0

    conn = await asyncpg.connect(db_dsn)
    try:
        await check_stored(conn, expected)
    finally:
        await conn.close()

    # What was counted.
    assert metric(text, "firehose_records_sanitized_total") == 1
    assert metric(text, "firehose_invalid_total", 'reason="cbor"') == 3  # 2 UTF-8 + 1 depth
    # the 1 MiB block's frame, and the write whose AT-URI is too long to index
    assert metric(text, "firehose_invalid_total", 'reason="too_large"') == 2


async def record(conn: asyncpg.Connection, did: str, path: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT record::text AS json, record, created_at FROM records WHERE uri = $1",
        f"at://{did}/{path}",
    )


async def check_stored(conn: asyncpg.Connection, expected: dict[str, Any]) -> None:
    # 1. NUL
    nul = await conn.fetchrow("SELECT text FROM posts WHERE did = $1", did_of("nul"))
    assert nul is not None and nul["text"] == "a\ufffdb"
    row = await record(conn, did_of("nul"), f"{POST}/3kaaaaaaaaaa2")
    assert row is not None and '"k\ufffdy": "v\ufffd"' in row["json"]

    # 2. invalid UTF-8: the two bad ops are absent, the good one stored
    uris = {
        r["uri"] for r in await conn.fetch("SELECT uri FROM records WHERE did = $1", did_of("utf8"))
    }
    assert uris == {f"at://{did_of('utf8')}/{POST}/3kaaaaaaaaaa4"}

    # 3. backslash escapes are text
    text = await conn.fetchval("SELECT text FROM posts WHERE did = $1", did_of("escape"))
    assert text == "\\ud800 \\u0000 \\\\"

    # 4. size cap
    assert await conn.fetchval("SELECT count(*) FROM records WHERE did = $1", did_of("huge")) == 0
    length = await conn.fetchval("SELECT length(text) FROM posts WHERE did = $1", did_of("big"))
    assert length == MAX_BLOCK_BYTES - 200

    # 5. nesting
    deep = await conn.fetch("SELECT uri FROM records WHERE did = $1", did_of("deep"))
    assert [r["uri"] for r in deep] == [f"at://{did_of('deep')}/{POST}/3kaaaaaaaaaa2"]

    # 6. datetimes: every record kept, created_at per the rule, in records and posts alike
    rows = await conn.fetch(
        "SELECT p.text, p.created_at, r.created_at AS r_created_at FROM posts p"
        " JOIN records r USING (uri) WHERE p.did = $1",
        did_of("dates"),
    )
    got = {int(r["text"]): r["created_at"] for r in rows}
    assert all(r["created_at"] == r["r_created_at"] for r in rows)
    assert got == {i: want for i, want in enumerate(DATETIMES.values())}

    # 7. oversized identifiers: NULL, the record kept; the 512-char rkey stored
    did = did_of("idents")
    like = await conn.fetchrow("SELECT subject_uri, subject_cid FROM likes WHERE did = $1", did)
    assert like is not None and like["subject_uri"] is None and like["subject_cid"] is None
    assert await conn.fetchval("SELECT subject_did FROM follows WHERE did = $1", did) is None
    item = await conn.fetchrow("SELECT list_uri, subject_did FROM list_items WHERE did = $1", did)
    assert item is not None and item["list_uri"] is None and item["subject_did"] is None
    reply = await conn.fetchrow(
        "SELECT reply_root_uri, reply_parent_uri, tags FROM posts WHERE did = $1", did
    )
    assert (
        reply is not None and reply["reply_root_uri"] is None and reply["reply_parent_uri"] is None
    )
    assert reply["tags"] == ["ok"]
    repost = await conn.fetchrow("SELECT subject_uri, subject_cid FROM reposts WHERE did = $1", did)
    assert repost is not None and repost["subject_uri"] is None and repost["subject_cid"] == "x"
    assert await conn.fetchval("SELECT subject_did FROM blocks WHERE did = $1", did) is None
    assert (
        await conn.fetchval("SELECT service_did FROM feed_generators WHERE did = $1", did) is None
    )
    assert await conn.fetchval("SELECT avatar_cid FROM profiles WHERE did = $1", did) is None
    assert await conn.fetchval("SELECT count(*) FROM records WHERE did = $1", did) == 9
    longest = await record(conn, did, f"{expected['long_nsid']}/{'k' * 512}")
    assert longest is not None

    # 8. an unstorable AT-URI: skipped, nothing half-written
    n = await conn.fetchval("SELECT count(*) FROM records WHERE did LIKE 'did:web:www%'")
    assert n == 0

    # 9. $type mismatch and wrong types
    did = did_of("types")
    like = await conn.fetchrow("SELECT subject_uri FROM likes WHERE did = $1", did)
    assert like is not None and like["subject_uri"] is None
    stored_type = await conn.fetchval(
        "SELECT record->>'$type' FROM records WHERE uri = $1", f"at://{did}/{LIKE}/3kaaaaaaaaaa2"
    )
    assert stored_type == POST  # the record is kept as it was written
    wrong = await conn.fetchrow(
        "SELECT text, langs, reply_root_uri, mentions, created_at FROM posts WHERE did = $1", did
    )
    assert wrong is not None
    assert (wrong["text"], wrong["langs"], wrong["reply_root_uri"]) == (None, None, None)
    assert wrong["mentions"] == [] and wrong["created_at"] is None
    assert await conn.fetchval("SELECT subject_did FROM follows WHERE did = $1", did) is None

    # 10. huge arrays are bounded in the typed columns, whole in the record
    arrays = await conn.fetchrow(
        "SELECT cardinality(langs) AS langs, cardinality(tags) AS tags,"
        " cardinality(mentions) AS mentions FROM posts WHERE did = $1",
        did_of("arrays"),
    )
    assert arrays is not None and tuple(arrays) == (MAX_ARRAY_ITEMS,) * 3
    n = await conn.fetchval(
        "SELECT jsonb_array_length(record->'tags') FROM records WHERE did = $1", did_of("arrays")
    )
    assert n == 5000

    # 11. integers beyond int64 are exact in jsonb
    ints = await conn.fetchrow(
        "SELECT record->>'big' AS big, record->>'small' AS small FROM records WHERE did = $1",
        did_of("ints"),
    )
    assert ints is not None and (ints["big"], ints["small"]) == (str(2**64 - 1), str(-(2**64)))

    # 12. identity and account events with hostile strings: stored as the rule says
    acct = await conn.fetchrow(
        "SELECT handle, status, active FROM actors WHERE did = $1", did_of("acct")
    )
    assert acct is not None and acct["handle"] is None
    assert acct["status"] == "deactivated" and acct["active"] is False
    acct2 = await conn.fetchrow("SELECT handle FROM actors WHERE did = $1", did_of("acct2"))
    assert acct2 is not None and acct2["handle"] is None

    # 13. the last post, after all of it
    assert await conn.fetchval("SELECT count(*) FROM posts WHERE did = $1", did_of("last")) == 1


# --- the rules as pure functions (fast, exhaustive) -----------------------------------------


@pytest.mark.parametrize(("value", "want"), list(DATETIMES.items()))
def test_created_at_rule(value: str, want: datetime | None) -> None:
    assert created_at_of({"createdAt": value}) == want


@pytest.mark.parametrize("value", list(DATETIMES))
def test_event_time_rule_agrees(value: str) -> None:
    """Where the record rule gives a time, the frame `time` parser (syntax.parse_datetime)
    gives the same instant."""
    want = DATETIMES[value]
    if want is not None:
        parsed = parse_datetime(value)
        assert parsed is not None and parsed.astimezone(UTC) == want


_DT_CHARS = st.sampled_from(string.digits + "-:.TZtz+ \u0662")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(_DT_CHARS, max_size=40),
        st.builds(
            lambda y, mo, d, h, mi, s, tz: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{tz}",
            st.integers(0, 10000),
            st.integers(0, 13),
            st.integers(0, 32),
            st.integers(0, 25),
            st.integers(0, 61),
            st.integers(0, 61),
            st.sampled_from(["Z", "+14:00", "-14:00", "+23:59", "-23:59", "+00:60", ""]),
        ),
    )
)
def test_created_at_is_none_or_storable(value: str) -> None:
    """Whatever the string, the rule gives None or an aware UTC datetime in 0001..9999,
    which PostgreSQL's timestamptz (4713 BC..294276 AD) always accepts."""
    got = created_at_of({"createdAt": value})
    assert got is None or (got.tzinfo is UTC and 1 <= got.year <= 9999)


def test_nesting_limit_and_torture_depth_bounded() -> None:
    record, _ = decode_record(block(nested(MAX_RECORD_DEPTH)))
    assert record["$type"] == POST
    with pytest.raises(ProtocolError) as err:
        decode_record(block(nested(MAX_RECORD_DEPTH + 1)))
    assert err.value.reason == "cbor" and "deep" in err.value.detail
    # A million nested arrays (1 MB of 0x81) as a record or as a frame body: a bounded
    # error, not a stack overflow.
    for data in (b"\xa1aa" + b"\x81" * 1_000_000 + b"\x00",):
        with pytest.raises(ProtocolError):
            decode_record(data)
    header = encode({"op": 1, "t": "#commit"})
    with pytest.raises(ProtocolError):
        decode_frame(header + b"\x81" * 1_000_000 + b"\x00")


def test_identity_and_account_strings_cleaned() -> None:
    did = did_of("acct")
    bad = decode_frame(event_frame("#identity", {"seq": 1, "did": did, "handle": "a\x00.test"}))
    assert isinstance(bad, IdentityEvent) and bad.handle is None
    good = decode_frame(event_frame("#identity", {"seq": 1, "did": did, "handle": "al.test"}))
    assert isinstance(good, IdentityEvent) and good.handle == "al.test"
    status = decode_frame(
        event_frame("#account", {"seq": 2, "did": did, "active": False, "status": "x\x00"})
    )
    assert isinstance(status, AccountEvent) and status.effective_status == "deactivated"
    known = decode_frame(
        event_frame("#account", {"seq": 2, "did": did, "active": False, "status": "takendown"})
    )
    assert isinstance(known, AccountEvent) and known.effective_status == "takendown"


def test_frames_are_decodable_by_the_worker() -> None:
    """The fixture's frames decode as the test expects (guards the test itself)."""
    frames, expected = hostile_frames()
    assert len(frames) == expected["last_seq"]
    first = decode_frame(frames[0])
    assert isinstance(first, CommitEvent) and first.writes[0].sanitized
    assert first.writes[0].cid == cid_str(
        cid_for_block(block(post("a\x00b", **{"k\x00y": "v\x00"})))
    )
