"""Fuzz targets: one function per decoder of untrusted bytes, shared by the hypothesis
tests (tests/test_fuzz_*.py) and the atheris harness (tests/fuzz/atheris_targets.py).

Each target takes the hostile input and returns normally when the outcome is allowed: a
value, or a typed error (`ProtocolError` with a bounded reason and detail; the backfill's
`FetchError`; for the row mapper, a row or None). Any other exception escapes and is the
finding. Where two implementations must agree, the target checks that too (an oracle
beyond "did not crash"):

* the whole-CAR reader and the streaming reader accept the same inputs, same blocks;
* the record decoder's libipld fast path and the pure-Python strict decoder give the same
  value, the same NUL-sanitised flag, or both refuse;
* the MST walk yields strictly increasing keys;
* every row the mapper makes is storable: JSON text PostgreSQL's jsonb accepts (no
  ``\\u0000``, valid UTF-8), text without NUL or lone surrogates, bounded arrays.

`TRIED` counts the inputs run per target (the pytest summary prints it).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from backfill.blocks import MemoryBlocks
from backfill.download import SkippedRecord, _check_snapshot, checked_snapshot
from backfill.handle_rules import did_from_txt, did_from_well_known
from backfill.hosts import FetchError
from backfill.record_fetch import verify_record_car
from backfill.since import PROFILE_COLLECTION, PROFILE_RKEY, SinceSuspect
from backfill.window import Window
from firehose.live.batch import shard_filter, shard_of
from firehose.model import (
    AccountEvent,
    Action,
    Batch,
    CommitEvent,
    IdentityEvent,
    OtherShardEvent,
    RecordWrite,
    SyncEvent,
)
from firehose.protocol.car import Car, CarStreamReader, read_car
from firehose.protocol.cbor import MAX_RECORD_DEPTH, _strict_decode, decode_json_form, decode_record
from firehose.protocol.errors import MAX_DETAIL_CHARS, REASONS, ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.protocol.mst import (
    CommitInfo,
    MissingSubtree,
    iter_repo_records,
    mst_lookup,
    read_commit,
    walk_mst,
    walk_mst_partial,
)
from firehose.protocol.syntax import is_did
from firehose.settings import WorkerSettings
from firehose.storage.prepare import ApplyStats, prepare, records_json
from firehose.storage.queries import TYPED_TABLES
from firehose.storage.rows import MAX_ARRAY_ITEMS, rows_of
from firehose.storage.snapshot_rows import snapshot_rows

TRIED: Counter[str] = Counter()
TARGETS = ("frames", "car", "mst", "records", "rows", "window", "handles")
COLLECTIONS = (*TYPED_TABLES, "com.example.other")
T = TypeVar("T")


def check_error(err: ProtocolError) -> None:
    """A typed error must carry a metric-safe reason and a log-safe detail."""
    assert err.reason in REASONS, err.reason
    assert len(err.detail) <= MAX_DETAIL_CHARS
    assert "\n" not in err.detail


def attempt(fn: Callable[[bytes], T], data: bytes) -> T | ProtocolError:
    """`fn(data)`, or the ProtocolError it raised (checked); anything else propagates."""
    try:
        return fn(data)
    except ProtocolError as err:
        check_error(err)
        return err


# --- frames ------------------------------------------------------------------------------


SHARDS = 2
_SHARD_FILTERS = [shard_filter(WorkerSettings(i, SHARDS)) for i in range(SHARDS)]


def fuzz_frame(data: bytes) -> None:
    """subscribeRepos frame -> event; a commit's records -> storable rows; the same frame
    through each sharded worker's decoder."""
    TRIED["frames"] += 1
    event = attempt(decode_frame, data)
    if isinstance(event, CommitEvent):
        for write in event.writes:
            check_rows(write)
        for reason, detail in event.invalid_ops:
            assert reason in REASONS and len(detail) <= MAX_DETAIL_CHARS
    check_shards(data, event)


def check_shards(data: bytes, full: object) -> None:
    """A shard decodes its own repos' events exactly as one worker does; another shard's it
    reads no further than their seq and time, and a frame refused whole stays refused."""
    got = [attempt(lambda d, o=owns: decode_frame(d, owns_did=o), data) for owns in _SHARD_FILTERS]
    if isinstance(full, ProtocolError):
        for one in got:
            assert isinstance(one, OtherShardEvent) or (
                isinstance(one, ProtocolError) and one.reason == full.reason
            ), (one, full)
    elif isinstance(full, CommitEvent | SyncEvent | IdentityEvent | AccountEvent):
        owner = shard_of(full.did, SHARDS)
        for i, one in enumerate(got):
            foreign = OtherShardEvent(full.seq, type(full).__name__, full.time)
            assert one == (full if i == owner else foreign), (i, one, full)
    else:
        assert all(one == full for one in got), (got, full)


# --- CAR ---------------------------------------------------------------------------------


def read_car_streaming(data: bytes, chunk: int) -> tuple[bytes, dict[bytes, bytes]]:
    reader = CarStreamReader()
    blocks: dict[bytes, bytes] = {}
    for i in range(0, len(data), chunk):
        blocks.update(reader.feed(data[i : i + chunk]))
    reader.close()
    assert reader.root_cid is not None
    return reader.root_cid, blocks


def fuzz_car(data: bytes) -> None:
    """Whole and streaming CAR readers: same verdict, same root and blocks."""
    TRIED["car"] += 1
    whole = attempt(read_car, data)
    chunk = 1 + (data[-1] if data else 0) * 7  # 1..1786-byte chunks, varied by the input
    streamed = attempt(lambda d: read_car_streaming(d, chunk), data)
    if isinstance(whole, Car):
        assert not isinstance(streamed, ProtocolError), f"stream refused a valid CAR: {streamed}"
        assert streamed == (whole.root_cid, whole.blocks)
    else:
        assert isinstance(streamed, ProtocolError), (
            f"stream accepted a CAR read_car refused: {whole}"
        )


# --- MST and the backfill snapshot --------------------------------------------------------


def fuzz_mst(data: bytes) -> None:
    """CAR -> MST walk (from the commit, and from the root for MST-only CARs) -> records,
    and the backfill's snapshot checks and writes over the same bytes."""
    TRIED["mst"] += 1
    car = attempt(read_car, data)
    if isinstance(car, ProtocolError):
        return
    attempt(_walk_repo, car)  # type: ignore[arg-type]
    attempt(_walk_from_root, car)  # type: ignore[arg-type]
    snapshot(data)


def _walk_repo(car: Car) -> None:
    _info, records = iter_repo_records(car)
    for _collection, _rkey, _cid, record in records:
        assert type(record) is dict


def _walk_from_root(car: Car) -> None:
    last = b""
    for key, cid in walk_mst(car.root_cid, car.blocks.get):
        raw = key.encode("utf-8")
        assert raw > last, "MST walk yielded keys out of order"
        assert len(cid) == 36
        last = raw


def snapshot(data: bytes, since: str | None = None) -> None:
    """What `backfill.download.fetch_repo` does with a downloaded CAR, minus the HTTP (with
    `since`: the checks of a window download's partial tree)."""
    reader = CarStreamReader()
    spool = MemoryBlocks()
    try:
        for cid, block in reader.feed(data):
            spool.add(cid, block)
        reader.close()
    except ProtocolError as err:
        check_error(err)
        return
    assert reader.root_cid is not None
    did = _commit_did(reader.root_cid, spool)
    entries: list[tuple[str, bytes]] = []
    try:
        checked = _check_snapshot(spool, reader.root_cid, did, entries, since)
    except (FetchError, SinceSuspect) as err:
        assert len(str(err)) < 1000
        return
    snap = checked_snapshot(did, checked, spool, entries, len(data))
    with snap:
        last = b""
        writes: list[RecordWrite] = []
        for item in snap.writes(Window(None)):
            if isinstance(item, RecordWrite):
                check_rows(item)
                key = f"{item.collection}/{item.rkey}".encode()
                assert key > last, "snapshot writes out of MST order"
                last = key
                writes.append(item)
            else:
                assert isinstance(item, SkippedRecord)
        # The backfill's own rows of the same records: the writer's, without its steps.
        items = [i for i in snap.items(Window(None)) if not isinstance(i, SkippedRecord)]
        heads = None if snap.head is None else [snap.head]
        direct, generic = ApplyStats(), ApplyStats()
        rows = snapshot_rows(did, items, heads, direct)
        assert rows == prepare(Batch(writes=writes), generic, heads) and direct == generic


def _commit_did(root: bytes, spool: MemoryBlocks | dict[bytes, bytes]) -> str:
    block = spool.get(root)
    if block is None:
        return "did:plc:unknown"
    info = attempt(read_commit, Car(None, root, {root: block}))  # type: ignore[arg-type]
    return "did:plc:unknown" if isinstance(info, ProtocolError) else info.did


# --- window downloads: the partial walk, since checks, getRecord proofs --------------------

# A since in the middle of the seeds' revs (2023..2025), so both branches of every rule run.
FUZZ_SINCE = "3kabcdefghij2"


def fuzz_window(data: bytes) -> None:
    """The same bytes as a `since` answer (partial snapshot checks and writes), as a partial
    tree (every other block dropped: `walk_mst_partial` and `mst_lookup` must agree with
    each other), and as a getRecord answer for the profile and for the first key."""
    TRIED["window"] += 1
    snapshot(data, FUZZ_SINCE)
    car = attempt(read_car, data)
    if isinstance(car, ProtocolError):
        return
    assert isinstance(car, Car)
    did = _commit_did(car.root_cid, car.blocks)
    first_key = None
    info = attempt(read_commit, car)  # type: ignore[arg-type]
    if isinstance(info, CommitInfo):
        kept = {cid: block for i, (cid, block) in enumerate(car.blocks.items()) if i % 2 == 0}
        partial = attempt(lambda _d: _partial_walk(info.data_cid, kept), b"")
        if isinstance(partial, str):
            first_key = partial
    for collection, rkey in ((PROFILE_COLLECTION, PROFILE_RKEY), _split(first_key)):
        try:
            proof = verify_record_car(data, did, collection, rkey)
        except FetchError as err:
            assert len(str(err)) < 1000
            continue
        assert proof.did == did and proof.rev
        if proof.write is not None:
            assert (proof.write.collection, proof.write.rkey) == (collection, rkey)
            check_rows(proof.write)


def _split(key: str | None) -> tuple[str, str]:
    collection, _, rkey = (key or "app.bsky.feed.post/3k2222222222").partition("/")
    return collection, rkey or "self"


def _partial_walk(data_cid: str, blocks: dict[bytes, bytes]) -> str | None:
    """Walk a partial tree; once the walk has checked the order of every key present, each
    key it found must be found by `mst_lookup` too (or its path be incomplete). Returns
    the first key."""
    last = b""
    first = None
    found_keys: list[tuple[str, bytes]] = []
    for item in walk_mst_partial(data_cid, blocks.get):
        if isinstance(item, MissingSubtree):
            assert item.after is None or item.after.encode() <= last
            continue
        key, cid = item
        raw = key.encode("utf-8")
        assert raw > last, "partial MST walk yielded keys out of order"
        last = raw
        first = first or key
        found_keys.append((key, cid))
    for key, cid in found_keys[:50]:
        found, at = mst_lookup(data_cid, key, blocks.get)
        assert found != "absent", f"walk found {key[:60]!r}, lookup says absent"
        assert found == "unknown" or at == cid
    return first


# --- records -----------------------------------------------------------------------------


def fuzz_record(data: bytes) -> None:
    """DAG-CBOR record: fast path == strict decoder; a decoded record maps to rows."""
    TRIED["records"] += 1
    fast = attempt(lambda d: decode_json_form(d, MAX_RECORD_DEPTH), data)
    flags = [False]
    strict = attempt(lambda d: _strict_decode(d, MAX_RECORD_DEPTH, flags), data)
    if isinstance(fast, ProtocolError):
        assert isinstance(strict, ProtocolError), f"fast path refused, strict took: {fast}"
    else:
        assert not isinstance(strict, ProtocolError), f"strict refused, fast path took: {strict}"
        assert fast == (strict, flags[0])
    record = attempt(decode_record, data)
    if isinstance(record, tuple):
        value, sanitized = record
        collection = COLLECTIONS[len(data) % len(COLLECTIONS)]
        check_rows(_write(collection, value, sanitized))


def _write(collection: str, record: dict[str, Any], sanitized: bool = False) -> RecordWrite:
    return RecordWrite(
        "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
        collection,
        "3jzfcijpj2z2a",
        "3jzfcijpj2z2b",
        Action.CREATE,
        "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        record,
        sanitized,
    )


# --- rows --------------------------------------------------------------------------------


def check_rows(write: RecordWrite) -> None:
    """The mapper gives storable rows (or None) for any record, never an exception."""
    TRIED["rows"] += 1
    rows = rows_of(write, write.uri)
    if not isinstance(write.record, dict) or write.cid is None:
        assert rows is None
        return
    assert rows is not None
    record_row, typed = rows
    # What the writer sends: the batch's JSON (one call, or record_json per record).
    text = records_json([record_row]).decode("utf-8")  # strict: no lone surrogate reaches PG
    _no_nul(json.loads(text)[0][6])  # jsonb refuses \u0000 (an escaped backslash is fine)
    created_at = record_row[7]
    assert created_at is None or (
        isinstance(created_at, datetime) and created_at.utcoffset() is not None
    )
    if typed is not None:
        table, row = typed
        assert table == TYPED_TABLES[write.collection].name
        assert len(row) == len(TYPED_TABLES[write.collection].all_columns)
        for value in row:
            _check_cell(value)


def _no_nul(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            assert "\x00" not in item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_cell(value: Any) -> None:
    if isinstance(value, str):
        assert "\x00" not in value
        value.encode("utf-8")
    elif isinstance(value, list):
        assert len(value) <= MAX_ARRAY_ITEMS
        for item in value:
            assert isinstance(item, str)
            _check_cell(item)
    else:
        assert value is None or isinstance(value, datetime | bool | int | float)


def fuzz_rows(write: RecordWrite) -> None:
    """Target for values that did not come through the decoder (JSON-like, hostile)."""
    check_rows(write)


def fuzz_handle_answer(data: bytes) -> None:
    """The handle check's readers (backfill/handle_rules.py): a well-known body, and the same
    bytes as DNS TXT records (one per line, in 255-byte character-strings). Either None or
    one syntactically valid DID without surrounding whitespace, never an exception."""
    TRIED["handles"] += 1
    records = [[line[i : i + 255] for i in range(0, len(line), 255)] for line in data.split(b"\n")]
    for did in (did_from_well_known(data), did_from_txt(records)):
        assert did is None or (is_did(did) and did == did.strip()), did


DISPATCH: dict[str, Callable[[bytes], None]] = {
    "frames": fuzz_frame,
    "car": fuzz_car,
    "mst": fuzz_mst,
    "records": fuzz_record,
    "handles": fuzz_handle_answer,
}
