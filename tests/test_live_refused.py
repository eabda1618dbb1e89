"""A live row PostgreSQL refuses skips that row alone; the stream goes on (issue 11's note:
before, the batch holding it was retried for ever, and the stream stopped there).

rows.py screens every value the writer knows to be unstorable (test_hygiene.py); here the
database refuses what the screening cannot foresee, by constraints the test adds: a record's
text and a handle. Real worker process, real websocket relay, real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from support import follow_until, serve_frames
from test_hygiene import POST, block, commit_frame, did_of, event_frame, metric, post

from firehose.protocol.syntax import make_tid

CREATED = "2024-05-01T12:00:00.000Z"


def frames() -> list[bytes]:
    return [
        commit_frame(1, did_of("first"), [(f"{POST}/3kaaaaaaaaaa2", block(post("one")))]),
        commit_frame(
            2,
            did_of("mixed"),
            [
                (f"{POST}/3kaaaaaaaaaa2", block(post("kept"))),
                (f"{POST}/3kaaaaaaaaaa3", block(post("refused"))),
            ],
        ),
        event_frame(
            "#identity",
            {"seq": 3, "did": did_of("named"), "handle": "refused.test", "time": CREATED},
        ),
        commit_frame(4, did_of("after"), [(f"{POST}/3kaaaaaaaaaa2", block(post("two")))]),
        commit_frame(5, did_of("last"), [(f"{POST}/3kaaaaaaaaaa2", block(post("the end")))]),
    ]


async def test_a_refused_row_is_skipped_and_the_stream_goes_on(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "ALTER TABLE records ADD CONSTRAINT hostile CHECK (record->>'text' <> 'refused')"
        )
        await conn.execute(
            "ALTER TABLE actors ADD CONSTRAINT hostile CHECK (handle <> 'refused.test')"
        )
    finally:
        await conn.close()

    async with serve_frames(frames()) as url:
        log, text = await follow_until(
            tmp_path,
            db_dsn,
            url,
            5,
            BATCH_MAX_EVENTS="10",
            BACKFILL_DAYS="0",
            VERIFY_SIGNATURES="false",  # unsigned test commits: signatures are another test's
        )
    refused_uri = f"at://{did_of('mixed')}/{POST}/3kaaaaaaaaaa3"
    assert "batch commit refused by PostgreSQL" in log, log[-3000:]
    assert f"skipping the create of {refused_uri} at rev" in log, log[-3000:]
    assert f"skipping the identity event of {did_of('named')} at seq 3" in log, log[-3000:]
    assert "batch commit failed" not in log, log[-3000:]  # not retried as a whole
    assert metric(text, "firehose_invalid_total", 'reason="refused"') == 2

    conn = await asyncpg.connect(db_dsn)
    try:
        texts = {
            r["did"]: r["texts"]
            for r in await conn.fetch(
                "SELECT did, array_agg(record->>'text' ORDER BY uri) AS texts"
                " FROM records GROUP BY did"
            )
        }
        assert texts == {
            did_of("first"): ["one"],
            did_of("mixed"): ["kept"],
            did_of("after"): ["two"],
            did_of("last"): ["the end"],
        }
        # The refused write's commit still moved its repo's head; the refused identity left
        # no handle.
        rev = await conn.fetchval("SELECT rev FROM actors WHERE did = $1", did_of("mixed"))
        assert rev == make_tid(1_700_000_000_000_000 + 2)  # commit_frame's rev for seq 2
        assert await conn.fetchval("SELECT count(*) FROM actors WHERE handle IS NOT NULL") == 0
    finally:
        await conn.close()
