"""`records` rows -> the data of a `COPY records FROM STDIN` (PostgreSQL's text format).

A pure transform (rows in, bytes out) for the fresh load of a big batch (fresh.py): a COPY
costs PostgreSQL less per record than the same rows INSERTed from one JSON parameter
(heap_multi_insert writes a page of rows per WAL record, and a bulk insert extends the table
by up to 64 pages at a time without writing zeros first): 10.5 % less of its CPU in
bench/backfill.py's alternated pairs, a gain of a few percent end to end, see
docs/performance-log.md (session 18).

Text format (https://www.postgresql.org/docs/16/sql-copy.html#id-1.9.3.55.9.2): one line per
row, columns separated by a tab, `\\N` for NULL, and a backslash, tab, newline or carriage
return inside a value written as `\\\\`, `\\t`, `\\n`, `\\r`. The record's JSON is orjson's
(or `rows.record_json`'s), as in the JSON parameter of the other paths: it never holds a raw
control character, so only its backslashes are doubled. `created_at` is written as orjson
writes a datetime, which is what the JSON path sends too, so both paths store the same value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from firehose.storage.rows import record_json

# The columns of the COPY, in the order of each line: the record last, so that the fixed
# part of a line is one string.
COPY_COLUMNS: tuple[str, ...] = (
    "uri",
    "did",
    "collection",
    "rkey",
    "cid",
    "rev",
    "created_at",
    "record",
)

_ID_COLUMNS = 6  # uri .. rev: text that a valid repo never fills with a special character
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = b"\\N"
_dumps = orjson.dumps


def records_copy(rows: Sequence[tuple[Any, ...]]) -> bytes:
    """The COPY text of `rows.rows_of` records rows (queries.RECORDS_COLUMNS order), one line
    each, in COPY_COLUMNS order. Raises ValueError for a value that is not text where
    text belongs (the caller then writes the rows another way)."""
    n = len(rows)
    if not n:
        return b""
    ids = "\n".join([f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\t{r[5]}" for r in rows])
    # One scan of the whole batch instead of four per value: the separators are all ours
    # only if the counts are exact and no value holds a backslash or carriage return.
    if (
        ids.count("\t") != _ID_COLUMNS * n - n
        or ids.count("\n") != n - 1
        or "\\" in ids
        or "\r" in ids
    ):
        ids = "\n".join(["\t".join([_text(v) for v in r[:_ID_COLUMNS]]) for r in rows])
    heads = ids.encode().split(b"\n")
    created = _created(rows)
    i = _ID_COLUMNS
    # One comprehension for the batch, and one scan of its whole text for what jsonb refuses
    # (a JSON `\u0000` escape, which doubled reads `\\u0000`): a loop with two scans and a
    # branch per line cost 1.49 against 1.30 µs per line (the real CAR of bench/instructions.py).
    # A match that is no such escape (`\u0000` written out in a text, an escaped id) only
    # costs the slower way. A record orjson cannot write, or one with \u0000, sends the
    # batch through `_record`, which gives every other line the same text.
    try:
        text = b"".join(
            [
                b"%s\t%s\t%s\n" % (head, at, _dumps(row[i]).replace(b"\\", b"\\\\"))
                for head, at, row in zip(heads, created, rows, strict=True)
            ]
        )
    except (TypeError, ValueError):
        pass
    else:
        # Without any backslash the text holds no escape at all: one memchr (~0.2 µs a batch)
        # instead of the search for the escape (~90 µs over a 500-record batch's 210 KB).
        if b"\\" not in text or b"\\\\u0000" not in text:
            return text
    return b"".join(
        [
            b"%s\t%s\t%s\n" % (head, at, _record(row[i]))
            for head, at, row in zip(heads, created, rows, strict=True)
        ]
    )


def _text(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"{type(value).__name__} where text belongs")
    return value.translate(_ESCAPES)


def _created(rows: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """Each row's created_at (a datetime or None, rows.created_at_of) as orjson writes it
    (RFC 3339), or \\N: one orjson call for the batch, split at its commas (a datetime's
    text has none, so a count that differs means a value that is no datetime)."""
    parts = _dumps([r[_ID_COLUMNS + 1] for r in rows])[1:-1].split(b",")
    if len(parts) != len(rows):
        raise ValueError("created_at is not a datetime")
    return [_NULL if p == b"null" else p[1:-1] for p in parts]


def _record(record: Any) -> bytes:
    try:
        text = _dumps(record)
    except (TypeError, ValueError):  # surrogates, ints beyond 64 bits, non-JSON values
        text = b""
    if not text or b"\\u0000" in text:
        # What jsonb refuses (\u0000) or orjson cannot write: record_json cleans it, as the
        # JSON path does (DESIGN.md invariant 5).
        text = record_json(record).encode()
    return text.replace(b"\\", b"\\\\") if b"\\" in text else text
