"""The COPY text of a fresh batch's records rows (firehose/storage/copy_text.py): what
PostgreSQL's own COPY parser reads back from it is exactly what the JSON path would store,
for any text in any column (real PostgreSQL, hypothesis), and a value the text cannot hold
is refused before anything is sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firehose.storage.copy_text import COPY_COLUMNS, records_copy
from firehose.storage.rows import record_json

# The records table's column types, in COPY_COLUMNS order (sql/001_initial.sql).
_SCRATCH = """
CREATE TEMP TABLE scratch (
    n serial, uri text COLLATE "C", did text COLLATE "C", collection text COLLATE "C",
    rkey text COLLATE "C", cid text COLLATE "C", rev text COLLATE "C",
    created_at timestamptz, record jsonb)
"""


def row(ids: tuple[str, ...], record: Any, created_at: datetime | None) -> tuple[Any, ...]:
    """A records row (queries.RECORDS_COLUMNS order: the record before created_at)."""
    return (*ids, record, created_at)


async def copied(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> list[Any]:
    """The rows as PostgreSQL's COPY parser reads `records_copy(rows)` back: (ids..., created_at,
    record as jsonb text) in input order."""
    await conn.execute("TRUNCATE scratch RESTART IDENTITY")
    data = records_copy(rows)
    await conn.copy_to_table("scratch", source=memoryview(data), columns=COPY_COLUMNS)
    got = await conn.fetch(f"SELECT {', '.join(COPY_COLUMNS)} FROM scratch ORDER BY n")
    return [(*r[:6], r["created_at"], r["record"]) for r in got]


async def expected(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> list[Any]:
    """What the JSON path sends for the same rows: the record as rows.record_json writes it,
    read by jsonb's input function."""
    out = []
    for r in rows:
        record = await conn.fetchval("SELECT $1::jsonb::text", record_json(r[6]))
        out.append((*r[:6], r[7], record))
    return out


@pytest.fixture
async def scratch(conn: asyncpg.Connection) -> asyncpg.Connection:
    await conn.execute(_SCRATCH)
    return conn


_IDS = ("at://did:plc:a/app.bsky.feed.post/3k", "did:plc:a", "app.bsky.feed.post", "3k")
_AT = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
_AT_PLUS_2 = _AT.astimezone(timezone(timedelta(hours=2)))


async def test_specials_in_every_column_round_trip(scratch: asyncpg.Connection) -> None:
    """Backslashes, tabs, newlines and carriage returns in the text columns (the slow path,
    which escapes value by value) and in the record (JSON escapes doubled); `\\.` (the old
    end-of-data marker) as a whole value; NUL in a record (cleaned like the JSON path); a
    record orjson refuses (an integer beyond 64 bits); created_at NULL, and with an offset."""
    rows = [
        row((*_IDS, "bafy1", "3lrev"), {"text": 'a\\b\t"c"\nd\re \U0001f98b'}, _AT),
        row(("at://x\\y", "did\tx", "c\nd", "r\re", "\\.", "3l"), {"t": "\\."}, None),
        row((*_IDS, "bafy3", "3lrev"), {"t": "nul\x00here", "k\x00": 1}, _AT),
        row(
            (*_IDS, "bafy4", "3lrev"), {"big": 2**70}, _AT.astimezone(timezone(timedelta(hours=2)))
        ),
    ]
    assert await copied(scratch, rows) == await expected(scratch, rows)


async def test_a_batch_without_specials_takes_the_fast_path_and_round_trips(
    scratch: asyncpg.Connection,
) -> None:
    like = "app.bsky.feed.like"
    rows = [
        row(
            (f"at://did:plc:a/{like}/3k{i}", "did:plc:a", like, f"3k{i}", f"bafy{i}", "3lrev"),
            {"$type": like, "subject": {"uri": "at://x", "cid": "bafyx"}, "n": i},
            _AT + timedelta(seconds=i) if i % 3 else None,
        )
        for i in range(300)
    ]
    data = records_copy(rows)
    assert data.count(b"\n") == len(rows) and data.endswith(b"\n")
    assert await copied(scratch, rows) == await expected(scratch, rows)


def test_values_the_text_cannot_hold_are_refused() -> None:
    """A non-text id or a created_at that is not a datetime raises ValueError (the writer
    then sends the rows in its statement, which reports or refuses them as before)."""
    good = (*_IDS, "bafy1", "3lrev")
    with pytest.raises(ValueError):
        records_copy([row((*_IDS, "bafy1", 5), {}, None), row((*_IDS, "b\\", "r"), {}, None)])
    with pytest.raises(ValueError):
        records_copy([row(good, {}, "2024-01-01T00:00:00Z,x")])  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # UnicodeEncodeError: a lone surrogate
        records_copy([row(("at://\ud800", *_IDS[1:], "bafy1", "3lrev"), {}, None)])
    assert records_copy([]) == b""


_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_created = st.none() | st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(
        st.tuples(st.tuples(*[_text] * 6), st.dictionaries(st.text(max_size=6), _json), _created),
        min_size=1,
        max_size=6,
    )
)
async def test_any_text_round_trips_through_postgresql(
    scratch: asyncpg.Connection, rows: list[Any]
) -> None:
    """Property: for any text in the six text columns (no NUL: storable() refuses such a
    uri, and PostgreSQL text cannot hold it), any JSON record (lone surrogates and NUL
    included, cleaned as the JSON path cleans them) and any created_at, PostgreSQL reads
    back the values the JSON path stores."""
    records = [row(ids, record, created) for ids, record, created in rows]
    assert await copied(scratch, records) == await expected(scratch, records)


def test_the_record_json_is_orjsons_with_backslashes_doubled() -> None:
    record = {"text": 'say "hi"\\', "n": [1, 2.5, None]}
    line = records_copy([row((*_IDS, "bafy1", "3lrev"), record, None)])
    want = orjson.dumps(record).replace(b"\\", b"\\\\")
    assert (
        line == b"\t".join([*(v.encode() for v in (*_IDS, "bafy1", "3lrev")), b"\\N", want]) + b"\n"
    )
