"""PURE mapping of record writes to database rows (no I/O).

`records_row()` gives the row of the `records` table (always written for a create/update);
`typed_row()` gives `(table, row)` for the typed table of an app.bsky collection, or None.

Rules (DESIGN.md invariant 5, "hostile input is data, not a crash"):
  * a field of the wrong type becomes NULL (or is left out of an array), never an exception;
  * identifier-like columns (AT-URIs, DIDs, CIDs, the items of mentions/links/tags) longer
    than MAX_INDEXED_TEXT_CHARS characters or MAX_INDEXED_TEXT_BYTES UTF-8 bytes become NULL:
    a btree index entry must stay under ~2700 bytes, a longer one fails the INSERT (and with it
    the whole batch). Legitimate identifiers are far shorter. Free text (post text, names,
    descriptions) is not indexed and is kept whole;
  * arrays are bounded: at most MAX_FACETS facets are read and at most MAX_ARRAY_ITEMS items
    kept per array;
  * NUL characters are replaced by U+FFFD and lone surrogates by '?', as PostgreSQL text/jsonb
    cannot hold them (the decoder already does the former; this is the storage's own guard).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from firehose.model import RecordWrite
from firehose.storage.queries import RECORDS_COLUMN_NAMES, TYPED_TABLES

try:  # orjson is several times faster; the stdlib is the fallback.
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None  # type: ignore[assignment]

MAX_INDEXED_TEXT_CHARS = 1000
MAX_INDEXED_TEXT_BYTES = 2000
MAX_FACETS = 100
MAX_ARRAY_ITEMS = 100

EMBED_KINDS = {
    "app.bsky.embed.images": "images",
    "app.bsky.embed.video": "video",
    "app.bsky.embed.external": "external",
    "app.bsky.embed.record": "record",
    "app.bsky.embed.recordWithMedia": "recordWithMedia",
}

Row = tuple[Any, ...]

# --- scalars ----------------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """`value` made storable in PostgreSQL text: no NUL, valid UTF-8."""
    if value.isascii():
        if "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _text(value: Any) -> str | None:
    return clean_text(value) if isinstance(value, str) else None


# Up to this many characters a string always fits MAX_INDEXED_TEXT_BYTES (4 bytes per char).
_FAST_CHARS = MAX_INDEXED_TEXT_BYTES // 4


def fits_index(value: str) -> bool:
    """Whether `value` may go into an indexed column (see the module docstring)."""
    if len(value) > MAX_INDEXED_TEXT_CHARS:
        return False
    return len(value) <= _FAST_CHARS or (
        len(value.encode("utf-8", "replace")) <= MAX_INDEXED_TEXT_BYTES
    )


def _ident(value: Any) -> str | None:
    if isinstance(value, str):
        # Fast path: short ASCII without NUL, i.e. every legitimate identifier.
        if len(value) <= _FAST_CHARS and value.isascii() and "\x00" not in value:
            return value
        if fits_index(value):
            return clean_text(value)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _ref_uri(value: Any) -> str | None:
    """The uri of a com.atproto.repo.strongRef."""
    return _ident(_dict(value).get("uri"))


def _ref_cid(value: Any) -> str | None:
    return _ident(_dict(value).get("cid"))


def _str_list(value: Any) -> list[str] | None:
    """A list of strings, bounded; non-strings are dropped; not a list: NULL."""
    if not isinstance(value, list):
        return None
    out: list[str] = []
    for item in value[:MAX_ARRAY_ITEMS]:
        if isinstance(item, str):
            out.append(clean_text(item))
    return out


def _blob_cid(value: Any) -> str | None:
    """CID of a blob ref: {"$type": "blob", "ref": {"$link": cid}} or the legacy {"cid": cid}."""
    blob = _dict(value)
    ref = blob.get("ref")
    if isinstance(ref, dict):
        return _ident(ref.get("$link"))
    return _ident(blob.get("cid"))


# --- datetimes --------------------------------------------------------------------------------

# The atproto datetime: RFC 3339, `T` and `Z` upper case, a timezone always present. The shape
# is checked here; datetime.fromisoformat (C, any number of fractional digits since 3.11) then
# does the parsing and rejects impossible dates, hours and leap seconds. ASCII digits only
# (`\d` would let Arabic-Indic digits through to fromisoformat) and offset minutes 00..59:
# fromisoformat reads "+00:60" as one hour, which is no RFC 3339 offset (issue 5, hygiene).
_FRACTION_DIGITS_MAX = 20  # both forms of the rule below
_DATETIME_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    rf"(?:\.[0-9]{{1,{_FRACTION_DIGITS_MAX}}})?"
    r"(?:Z|[+-][0-9]{2}:[0-5][0-9])"
)
# The same rule for the form nearly every record has (UTC, `Z`, up to 20 fractional digits),
# as a set of shapes: the value's bytes with every ASCII digit read as `0` must be one of
# them. 90 against 255 ns for the regex (side by side in one process: a ratio), on every
# record of the backfill and the live stream; any other form (an offset, a non-ASCII
# character) still goes to the regex.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0000000000")
_UTC_SHAPES = frozenset(
    [b"0000-00-00T00:00:00Z"]
    + [b"0000-00-00T00:00:00." + b"0" * n + b"Z" for n in range(1, _FRACTION_DIGITS_MAX + 1)]
)


def created_at_of(record: Any) -> datetime | None:
    """The record's `createdAt` as an aware UTC datetime, or None.

    Anything that is not an atproto datetime (no timezone, impossible dates, leap seconds,
    years outside 0001..9999 once in UTC, which is what both Python and PostgreSQL can hold)
    gives None rather than an error.
    """
    if not isinstance(record, dict):
        return None
    value = record.get("createdAt")
    if not isinstance(value, str):
        return None
    if not (value.isascii() and value.encode().translate(_DIGITS_AS_ZERO) in _UTC_SHAPES) and (
        _DATETIME_RE.fullmatch(value) is None
    ):
        return None
    try:
        at = datetime.fromisoformat(value)
        # A `Z` value is read as UTC already: no second datetime (~45 ns, every record).
        return at if at.tzinfo is UTC else at.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


# --- typed tables -----------------------------------------------------------------------------


def _post(rec: dict[str, Any]) -> Row:
    reply = _dict(rec.get("reply"))
    embed = _dict(rec.get("embed"))
    embed_type = embed.get("$type")
    kind = EMBED_KINDS.get(embed_type) if isinstance(embed_type, str) else None
    quote = None
    if kind == "record":
        quote = _ref_uri(embed.get("record"))
    elif kind == "recordWithMedia":
        quote = _ref_uri(_dict(embed.get("record")).get("record"))

    mentions: list[str] = []
    links: list[str] = []
    tags: list[str] = []
    facets = rec.get("facets")
    if isinstance(facets, list):
        for facet in facets[:MAX_FACETS]:
            features = _dict(facet).get("features")
            if not isinstance(features, list):
                continue
            for feature in features[:MAX_ARRAY_ITEMS]:
                f = _dict(feature)
                ftype = f.get("$type")
                if ftype == "app.bsky.richtext.facet#mention":
                    _add(mentions, _ident(f.get("did")))
                elif ftype == "app.bsky.richtext.facet#link":
                    _add(links, _ident(f.get("uri")))
                elif ftype == "app.bsky.richtext.facet#tag":
                    _add(tags, _ident(f.get("tag")))
    own_tags = rec.get("tags")
    if isinstance(own_tags, list):
        for tag in own_tags[:MAX_ARRAY_ITEMS]:
            _add(tags, _ident(tag))

    return (
        _text(rec.get("text")),
        _str_list(rec.get("langs")),
        _ref_uri(reply.get("root")),
        _ref_uri(reply.get("parent")),
        quote,
        kind,
        mentions,
        links,
        tags,
    )


def _add(items: list[str], value: str | None) -> None:
    """Append a distinct value, keeping the array bounded."""
    if value is not None and len(items) < MAX_ARRAY_ITEMS and value not in items:
        items.append(value)


def _subject_ref(rec: dict[str, Any]) -> Row:
    subject = rec.get("subject")
    if not isinstance(subject, dict):
        return (None, None)
    return (_ident(subject.get("uri")), _ident(subject.get("cid")))


def _subject_did(rec: dict[str, Any]) -> Row:
    return (_ident(rec.get("subject")),)


def _profile(rec: dict[str, Any]) -> Row:
    return (
        _text(rec.get("displayName")),
        _text(rec.get("description")),
        _blob_cid(rec.get("avatar")),
        _blob_cid(rec.get("banner")),
    )


def _list(rec: dict[str, Any]) -> Row:
    return (_text(rec.get("name")), _text(rec.get("purpose")), _text(rec.get("description")))


def _list_item(rec: dict[str, Any]) -> Row:
    return (_ident(rec.get("list")), _ident(rec.get("subject")))


def _feed_generator(rec: dict[str, Any]) -> Row:
    return (
        _ident(rec.get("did")),
        _text(rec.get("displayName")),
        _text(rec.get("description")),
    )


def _starter_pack(rec: dict[str, Any]) -> Row:
    return (_text(rec.get("name")), _text(rec.get("description")), _ident(rec.get("list")))


# collection -> (table, extractor of the columns after the common ones)
_EXTRACTORS: dict[str, Callable[[dict[str, Any]], Row]] = {
    "app.bsky.feed.post": _post,
    "app.bsky.feed.like": _subject_ref,
    "app.bsky.feed.repost": _subject_ref,
    "app.bsky.graph.follow": _subject_did,
    "app.bsky.graph.block": _subject_did,
    "app.bsky.actor.profile": _profile,
    "app.bsky.graph.list": _list,
    "app.bsky.graph.listitem": _list_item,
    "app.bsky.feed.generator": _feed_generator,
    "app.bsky.graph.starterpack": _starter_pack,
}
_TABLES = {c: (TYPED_TABLES[c].name, fn) for c, fn in _EXTRACTORS.items()}

_UNSET: Any = object()


def typed_row(write: RecordWrite, created_at: datetime | None = _UNSET) -> tuple[str, Row] | None:
    """`(table, row)` of the typed table for a create/update, or None (not app.bsky, no record).

    The row's columns are `queries.TYPED_TABLES[collection].all_columns`: uri, did, rkey, cid,
    rev, created_at, then the table's own. Pass `created_at` when already computed.
    """
    record = write.record
    if not isinstance(record, dict) or write.cid is None:
        return None
    if created_at is _UNSET:
        created_at = created_at_of(record)
    w = write
    return typed_layout(
        records_layout(w.uri, w.did, w.collection, w.rkey, w.cid, w.rev, record, created_at)
    )


def typed_layout(row: Row) -> tuple[str, Row] | None:
    """`(table, row)` in the layout of `typed_row`, of a `records_layout` row whose record is
    the dict; None when its collection has no typed table."""
    entry = _TABLES.get(row[2])
    if entry is None:
        return None
    table, extract = entry
    uri, did, _collection, rkey, cid, rev, record, created_at = row
    return table, (uri, did, rkey, cid, rev, created_at, *extract(record))


# --- records ----------------------------------------------------------------------------------


# Decoded records are at most cbor.MAX_RECORD_DEPTH (64) deep; a value handed to the mapper
# by other code could be deeper, and recursing through it would raise RecursionError near
# Python's limit of 1000 frames (found by fuzzing): below this depth values become null.
MAX_SANITIZE_DEPTH = 256


def _sanitize(value: Any, depth: int = MAX_SANITIZE_DEPTH) -> Any:
    """A JSON-safe copy: text cleaned (keys too), non-finite floats, unknown types and
    anything nested deeper than MAX_SANITIZE_DEPTH nulled."""
    if isinstance(value, str):
        return clean_text(value)
    if depth <= 0:
        return None
    if isinstance(value, dict):
        return {clean_text(str(k)): _sanitize(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v, depth - 1) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def record_json(record: dict[str, Any]) -> str:
    """The record as JSON text that PostgreSQL's jsonb accepts (no \\u0000, valid UTF-8)."""
    if _orjson is not None:
        try:
            text: str = _orjson.dumps(record).decode("utf-8")
        except (TypeError, ValueError):  # surrogates, ints beyond 64 bits, non-JSON values
            text = ""
        if text and "\\u0000" not in text:
            return text
    else:  # pragma: no cover
        try:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            if "\\u0000" not in text:
                text.encode("utf-8")
                return text
        except (TypeError, ValueError):
            pass
    return json.dumps(_sanitize(record), ensure_ascii=False, separators=(",", ":"))


def records_row(write: RecordWrite, created_at: datetime | None = _UNSET) -> Row | None:
    """The `records` row (queries.RECORDS_COLUMNS order) of a create/update, or None if the
    write carries no record or cid (nothing storable)."""
    record = write.record
    if not isinstance(record, dict) or write.cid is None:
        return None
    if created_at is _UNSET:
        created_at = created_at_of(record)
    w = write
    return records_layout(
        w.uri, w.did, w.collection, w.rkey, w.cid, w.rev, record_json(record), created_at
    )


# The row layouts take the write's fields one by one, so that a snapshot's records
# (snapshot_rows.py, which builds no RecordWrite) are laid out by the same functions.
def records_layout(
    uri: str,
    did: str,
    collection: str,
    rkey: str,
    cid: str | None,
    rev: str,
    record: Any,
    created_at: datetime | None,
) -> Row:
    """The `records` row in the layout of `records_row` (queries.RECORDS_COLUMNS)."""
    return (uri, did, collection, rkey, cid, rev, record, created_at)


RECORD_COLUMN = RECORDS_COLUMN_NAMES.index("record")  # its place in a `records` row


def with_record_json(row: Row) -> Row:
    """A `rows_of` records row with its record column as JSON text (`record_json`)."""
    i = RECORD_COLUMN
    return (*row[:i], record_json(row[i]), *row[i + 1 :])


def rows_of(write: RecordWrite, uri: str) -> tuple[Row, tuple[str, Row] | None] | None:
    """Both rows of a create/update whose `uri` is already computed (the writer's hot path):
    `(records row, (typed table, row) or None)`, or None if there is no record to store.

    The records row holds the record itself (a dict), not its JSON text: the writer turns a
    whole batch of rows into JSON in one call (prepare.records_json), falling back to
    `record_json` per record for what that call refuses (`with_record_json`)."""
    record = write.record
    if not isinstance(record, dict) or write.cid is None:
        return None
    w, at = write, created_at_of(record)
    row = records_layout(uri, w.did, w.collection, w.rkey, w.cid, w.rev, record, at)
    return row, typed_layout(row)


def storable(write: RecordWrite, uri: str | None = None) -> bool:
    """Whether the write's identifiers can be stored at all: the uri (a primary key) fits a
    btree entry and uri/rev/cid hold no NUL or invalid UTF-8. A write failing this is hostile
    input; the writer counts and skips it rather than failing the whole batch."""
    return storable_ids(write.uri if uri is None else uri, write.rev, write.cid)


def storable_ids(uri: str, rev: str, cid: str | None) -> bool:
    """`storable` for a write's identifiers, given one by one (snapshot_rows.py)."""
    if (
        len(uri) <= _FAST_CHARS
        and uri.isascii()
        and "\x00" not in uri
        and 0 < len(rev) <= _FAST_CHARS
        and rev.isascii()
        and "\x00" not in rev
        and (cid is None or (len(cid) <= _FAST_CHARS and cid.isascii() and "\x00" not in cid))
    ):
        return True  # fast path: every legitimate write
    if not rev or not fits_index(uri) or not fits_index(rev):
        return False
    if clean_text(uri) is not uri or clean_text(rev) is not rev:
        return False
    return cid is None or (fits_index(cid) and clean_text(cid) is cid)
