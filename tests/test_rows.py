"""rows.py: pure record -> row mapping (no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firehose.model import Action, RecordWrite
from firehose.storage import queries, rows
from firehose.storage.prepare import records_json
from firehose.storage.rows import (
    MAX_ARRAY_ITEMS,
    MAX_INDEXED_TEXT_CHARS,
    created_at_of,
    fits_index,
    record_json,
    records_row,
    rows_of,
    storable,
    typed_row,
    with_record_json,
)

DID = "did:plc:alice"
REF = {"uri": "at://did:plc:bob/app.bsky.feed.post/3k", "cid": "bafyref"}


def w(
    collection: str, record: Any, rkey: str = "3kabc", cid: str | None = "bafyrec"
) -> RecordWrite:
    return RecordWrite(DID, collection, rkey, "3krev", Action.CREATE, cid, record)


def cols(collection: str, record: Any) -> dict[str, Any]:
    got = typed_row(w(collection, record))
    assert got is not None
    table, row = got
    spec = queries.TYPED_TABLES[collection]
    assert table == spec.name
    assert len(row) == len(spec.all_columns)
    return dict(zip(spec.all_columns, row, strict=True))


def test_common_columns() -> None:
    c = cols("app.bsky.feed.like", {"subject": REF, "createdAt": "2024-01-02T03:04:05Z"})
    assert c["uri"] == f"at://{DID}/app.bsky.feed.like/3kabc"
    assert (c["did"], c["rkey"], c["cid"], c["rev"]) == (DID, "3kabc", "bafyrec", "3krev")
    assert c["created_at"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (c["subject_uri"], c["subject_cid"]) == (REF["uri"], "bafyref")


def test_post_full() -> None:
    record = {
        "$type": "app.bsky.feed.post",
        "text": "hi @bob #Tag https://x.y",
        "langs": ["en", 5, "fr"],
        "reply": {"root": REF, "parent": {"uri": "at://p", "cid": "c"}},
        "embed": {"$type": "app.bsky.embed.record", "record": {"uri": "at://q", "cid": "c"}},
        "tags": ["own", "Tag"],
        "facets": [
            {
                "index": {"byteStart": 3, "byteEnd": 7},
                "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:bob"}],
            },
            {"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "Tag"}]},
            {"features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://x.y"}]},
            {"features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:bob"}]},
            {"features": [{"$type": "com.example#unknown", "x": 1}, "junk", None]},
            "junk",
            {"features": "junk"},
        ],
        "createdAt": "2024-01-02T03:04:05.123456789+01:00",
    }
    c = cols("app.bsky.feed.post", record)
    assert c["text"] == "hi @bob #Tag https://x.y"
    assert c["langs"] == ["en", "fr"]
    assert (c["reply_root_uri"], c["reply_parent_uri"]) == (REF["uri"], "at://p")
    assert (c["quote_uri"], c["embed_kind"]) == ("at://q", "record")
    assert c["mentions"] == ["did:plc:bob"]
    assert c["links"] == ["https://x.y"]
    assert c["tags"] == ["Tag", "own"]
    assert c["created_at"] == datetime(2024, 1, 2, 2, 4, 5, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("embed", "kind", "quote"),
    [
        ({"$type": "app.bsky.embed.images", "images": []}, "images", None),
        ({"$type": "app.bsky.embed.video", "video": {}}, "video", None),
        ({"$type": "app.bsky.embed.external", "external": {}}, "external", None),
        ({"$type": "app.bsky.embed.record", "record": REF}, "record", REF["uri"]),
        (
            {"$type": "app.bsky.embed.recordWithMedia", "record": {"record": REF}, "media": {}},
            "recordWithMedia",
            REF["uri"],
        ),
        ({"$type": "app.bsky.embed.recordWithMedia", "record": REF}, "recordWithMedia", None),
        ({"$type": "app.bsky.embed.record", "record": "junk"}, "record", None),
        ({"$type": "com.example.embed"}, None, None),
        ({"$type": 5}, None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_post_embed_kinds(embed: Any, kind: str | None, quote: str | None) -> None:
    c = cols("app.bsky.feed.post", {"text": "x", "embed": embed})
    assert (c["embed_kind"], c["quote_uri"]) == (kind, quote)


def test_post_wrong_types_are_null() -> None:
    c = cols(
        "app.bsky.feed.post",
        {
            "text": 5,
            "langs": "en",
            "reply": {"root": "at://x", "parent": {"uri": 7}},
            "facets": {"not": "a list"},
            "tags": "nope",
            "createdAt": 1700000000,
        },
    )
    assert c["text"] is None and c["langs"] is None
    assert c["reply_root_uri"] is None and c["reply_parent_uri"] is None
    assert c["mentions"] == [] and c["links"] == [] and c["tags"] == []
    assert c["created_at"] is None


def test_post_arrays_are_bounded() -> None:
    facets = [
        {"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": f"t{i}"}]}
        for i in range(1000)
    ]
    c = cols(
        "app.bsky.feed.post",
        {"facets": facets, "langs": ["en"] * 1000, "tags": [f"o{i}" for i in range(500)]},
    )
    assert len(c["tags"]) == MAX_ARRAY_ITEMS
    assert len(c["langs"]) == MAX_ARRAY_ITEMS


def test_oversized_indexed_strings_are_null() -> None:
    long_uri = "at://" + "x" * MAX_INDEXED_TEXT_CHARS
    wide = "at://" + "\U0001f600" * 600  # 600 chars but 2400 UTF-8 bytes
    c = cols("app.bsky.feed.like", {"subject": {"uri": long_uri, "cid": wide}})
    assert c["subject_uri"] is None and c["subject_cid"] is None
    c = cols("app.bsky.feed.post", {"text": "y" * 100_000, "reply": {"root": {"uri": long_uri}}})
    assert c["text"] == "y" * 100_000  # free text is not indexed: kept whole
    assert c["reply_root_uri"] is None
    assert fits_index("a" * MAX_INDEXED_TEXT_CHARS)
    assert not fits_index("a" * (MAX_INDEXED_TEXT_CHARS + 1))
    assert not fits_index(wide)


@pytest.mark.parametrize(
    ("collection", "record", "expected"),
    [
        ("app.bsky.feed.repost", {"subject": REF}, {"subject_uri": REF["uri"]}),
        ("app.bsky.feed.repost", {"subject": "at://x"}, {"subject_uri": None}),
        ("app.bsky.graph.follow", {"subject": "did:plc:bob"}, {"subject_did": "did:plc:bob"}),
        ("app.bsky.graph.follow", {"subject": {"did": "x"}}, {"subject_did": None}),
        ("app.bsky.graph.block", {"subject": "did:plc:bob"}, {"subject_did": "did:plc:bob"}),
        (
            "app.bsky.actor.profile",
            {
                "displayName": "Alice",
                "description": "hello",
                "avatar": {
                    "$type": "blob",
                    "ref": {"$link": "bafkav"},
                    "mimeType": "image/png",
                    "size": 3,
                },
                "banner": {"cid": "bafklegacy", "mimeType": "image/png"},
            },
            {
                "display_name": "Alice",
                "description": "hello",
                "avatar_cid": "bafkav",
                "banner_cid": "bafklegacy",
            },
        ),
        (
            "app.bsky.actor.profile",
            {"displayName": ["x"], "avatar": "bafk", "banner": {"ref": "x"}},
            {"display_name": None, "avatar_cid": None, "banner_cid": None},
        ),
        (
            "app.bsky.graph.list",
            {"name": "L", "purpose": "app.bsky.graph.defs#modlist", "description": "d"},
            {"name": "L", "purpose": "app.bsky.graph.defs#modlist", "description": "d"},
        ),
        (
            "app.bsky.graph.listitem",
            {"list": "at://did:plc:a/app.bsky.graph.list/1", "subject": "did:plc:b"},
            {"list_uri": "at://did:plc:a/app.bsky.graph.list/1", "subject_did": "did:plc:b"},
        ),
        (
            "app.bsky.feed.generator",
            {"did": "did:web:feed.example", "displayName": "F", "description": None},
            {"service_did": "did:web:feed.example", "display_name": "F", "description": None},
        ),
        (
            "app.bsky.graph.starterpack",
            {"name": "S", "description": "d", "list": "at://l"},
            {"name": "S", "description": "d", "list_uri": "at://l"},
        ),
    ],
)
def test_collections(collection: str, record: dict[str, Any], expected: dict[str, Any]) -> None:
    c = cols(collection, record)
    for key, value in expected.items():
        assert c[key] == value, key


def test_no_typed_row() -> None:
    assert typed_row(w("com.example.thing", {"a": 1})) is None
    assert typed_row(w("app.bsky.feed.post", None)) is None
    assert typed_row(w("app.bsky.feed.post", {"text": "x"}, cid=None)) is None
    # The records row exists for any collection.
    row = records_row(w("com.example.thing", {"a": 1}))
    assert row is not None and row[2] == "com.example.thing"
    assert records_row(w("com.example.thing", None)) is None


_AT = {"createdAt": "2024-01-02T03:04:05Z"}


@pytest.mark.parametrize(
    ("collection", "record"),
    [
        ("app.bsky.feed.like", {"subject": REF, **_AT}),
        ("app.bsky.feed.repost", {"subject": REF, **_AT}),
        ("app.bsky.feed.post", {"text": "hi", "langs": ["en"], "reply": {"root": REF}, **_AT}),
        ("app.bsky.graph.follow", {"subject": "did:plc:bob", **_AT}),
        ("app.bsky.graph.block", {"subject": "did:plc:bob", **_AT}),
        ("app.bsky.actor.profile", {"displayName": "B", "avatar": {"cid": "bafyav"}}),
        ("app.bsky.graph.list", {"name": "l", "purpose": "p", **_AT}),
        ("app.bsky.graph.listitem", {"list": REF["uri"], "subject": "did:plc:bob", **_AT}),
        ("app.bsky.feed.generator", {"did": "did:web:feed", "displayName": "F", **_AT}),
        ("app.bsky.graph.starterpack", {"name": "s", "list": REF["uri"], **_AT}),
        ("com.example.thing", {"a": 1, **_AT}),
    ],
)
def test_rows_of_matches_the_single_functions(collection: str, record: dict[str, Any]) -> None:
    """rows_of (the writer's hot path) gives the same rows, for every typed table and for a
    collection without one, as records_row and typed_row."""
    write = w(collection, record)
    both = rows_of(write, write.uri)
    assert both is not None
    # rows_of keeps the record itself for the writer's one-call JSON of a batch.
    assert (with_record_json(both[0]), both[1]) == (records_row(write), typed_row(write))
    row = records_row(write)
    assert row is not None and len(row) == len(queries.RECORDS_COLUMNS)
    table = queries.TYPED_TABLES.get(collection)
    if table is None:
        assert both[1] is None
    else:
        assert both[1] is not None and len(both[1][1]) == len(table.all_columns)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05.1Z", datetime(2024, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)),
        ("2024-01-02T03:04:05-05:30", datetime(2024, 1, 2, 8, 34, 5, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59Z", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("0001-01-01T00:00:00+01:00", None),  # year 0 in UTC
        ("9999-12-31T23:00:00-05:00", None),  # year 10000 in UTC
        ("0000-01-01T00:00:00Z", None),
        ("2024-02-30T00:00:00Z", None),
        ("2024-01-02T24:00:00Z", None),
        ("2024-01-02T03:04:60Z", None),  # leap second
        ("2024-01-02T03:04:05+24:00", None),
        ("2024-01-02T03:04:05", None),  # no timezone
        ("2024-01-02", None),
        ("2024-01-02 03:04:05Z", None),
        ("2024-W01-1T00:00:00Z", None),
        ("20240102T030405Z", None),
        ("12024-01-02T03:04:05Z", None),
        ("2024-01-02T03:04:05." + "1" * 100 + "Z", None),
        ("", None),
        (1700000000, None),
        (None, None),
    ],
)
def test_created_at(value: Any, expected: datetime | None) -> None:
    assert created_at_of({"createdAt": value}) == expected


def _created_at_by_regex(value: str) -> datetime | None:
    """The rule as the regex alone states it: the reference for the shapes' fast path."""
    if rows._DATETIME_RE.fullmatch(value) is None:
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


_NEAR_DATETIME = st.builds(
    lambda date, t, time, fraction, zone: f"{date}{t}{time}{fraction}{zone}",
    st.one_of(
        st.dates().map(lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d}"),
        st.from_regex(r"[0-9\u0662x]{4}-[0-9]{2}-[0-9]{1,3}", fullmatch=True),
    ),
    st.sampled_from(["T", "t", " "]),
    st.one_of(
        st.times().map(lambda t: t.strftime("%H:%M:%S")),
        st.from_regex(r"[0-9]{2}:[0-9 ]{2}:[0-9]{2}", fullmatch=True),
    ),
    st.one_of(
        st.just(""),
        st.integers(0, 24).map(lambda n: "." + "7" * n),
        st.text("0123456789a", max_size=24).map(".".__add__),
    ),
    st.sampled_from(["Z", "z", "", "+01:30", "-00:60", "Z\n", "\u0662", "\ud800"]),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_NEAR_DATETIME, st.text("0123456789-:.TZ+", max_size=32)))
def test_created_at_shapes_agree_with_the_regex(value: str) -> None:
    """created_at_of's shape set (the UTC forms, without the regex) accepts exactly what the
    regex accepts: near misses (a letter for a digit, 21 fractional digits, a lower-case t or z,
    a trailing newline, a lone surrogate) fall through to it and get its answer."""
    assert created_at_of({"createdAt": value}) == _created_at_by_regex(value)


def test_created_at_of_non_dict() -> None:
    assert created_at_of(None) is None
    assert created_at_of([]) is None


def test_record_json_is_jsonb_safe() -> None:
    assert json.loads(record_json({"a": {"$link": "bafy"}, "b": [1, 2.5, None, True]})) == {
        "a": {"$link": "bafy"},
        "b": [1, 2.5, None, True],
    }
    text = record_json({"k\x00": "v\x00", "s": "x\ud800", "n": 2**80, "f": float("nan")})
    assert "\\u0000" not in text and "\x00" not in text
    text.encode("utf-8")
    assert json.loads(text) == {"k\ufffd": "v\ufffd", "s": "x?", "n": 2**80, "f": None}
    # A literal backslash-u sequence in text is kept as text.
    assert json.loads(record_json({"t": "\\u0000"})) == {"t": "\\u0000"}


def test_storable() -> None:
    assert storable(w("app.bsky.feed.like", {}))
    assert not storable(w("app.bsky.feed.like", {}, rkey="k" * 3000))
    assert not storable(w("app.bsky.feed.like", {}, rkey="k\x00"))
    assert not storable(w("app.bsky.feed.like", {}, cid="c\x00"))
    assert not storable(RecordWrite(DID, "c.o.l", "k", "", Action.CREATE, "c", {}))
    assert storable(w("app.bsky.feed.like", {}, rkey="ké"))  # non-ASCII but valid: slow path
    assert not storable(w("app.bsky.feed.like", {}, rkey="k\ud800"))


# -- the writer's one-call JSON of a batch of records rows ------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8)
)
_records = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        _json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=8,
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, min_size=1, max_size=4))
def test_records_json_of_a_batch_equals_record_by_record(records: list[dict[str, Any]]) -> None:
    # prepare.records_json serializes a batch in one call and falls back to record_json per
    # record when that call cannot be stored (surrogates, ints beyond 64 bits, \u0000): the
    # stored JSON must be record_json's, record for record, whichever path was taken.
    writes = [
        RecordWrite("did:plc:a", "app.bsky.feed.post", f"r{i}", "3k2a", Action.CREATE, "bafy", r)
        for i, r in enumerate(records)
    ]
    rows = [rows_of(w, w.uri) for w in writes]
    text = records_json([r[0] for r in rows if r is not None]).decode()  # strict UTF-8
    assert "\\u0000" not in text.replace("\\\\", "")
    stored = [row[6] for row in json.loads(text)]
    assert stored == [json.loads(record_json(r)) for r in records]
    assert [with_record_json(r[0])[6] for r in rows if r is not None] == [
        record_json(r) for r in records
    ]
