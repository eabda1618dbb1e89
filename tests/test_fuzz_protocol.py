"""Property fuzzing of every decoder of untrusted bytes, seeded with real data.

Targets (tests/fuzz/targets.py): the frame decoder, the CAR reader (whole and streaming,
which must agree), the MST walker with the backfill's snapshot checks, the DAG-CBOR record
decoder (fast path and strict decoder must agree) and the record -> rows mapper (decoded
records and arbitrary JSON-like values). Seeds (tests/fuzz/corpus.py) are captured relay
frames, real repository CARs, the mst-test-suite CARs and the codec fixtures; the
mutations (tests/fuzz/mutations.py) flip, insert, delete, splice, corrupt lengths and CIDs
and re-hash mutated blocks so that the hash checks pass and the inner decoders are reached.

Budget: ``FUZZ_EXAMPLES`` examples per target (default below: the CI budget, ~25 s in all
on 2 cores), derandomized and without an example database, so every CI run tries the same
inputs and a failure reproduces. ``FUZZ_SEED=<int>`` switches to a random search from that
seed (for long manual runs: ``FUZZ_EXAMPLES=20000 FUZZ_SEED=$RANDOM pytest tests/test_fuzz_*``).
The count of inputs tried is printed at the end of the pytest run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from fuzz.corpus import (
    car_seeds,
    frame_seeds,
    handle_answer_seeds,
    mst_cars,
    record_seeds,
    repo_cars,
)
from fuzz.mutations import car_sections, mutated, rehash_car
from fuzz.targets import (
    COLLECTIONS,
    DISPATCH,
    TRIED,
    _write,
    attempt,
    fuzz_car,
    fuzz_frame,
    fuzz_handle_answer,
    fuzz_mst,
    fuzz_record,
    fuzz_rows,
    fuzz_window,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from firehose.model import Action, CommitEvent, RecordWrite
from firehose.protocol.car import read_car
from firehose.protocol.cid import CID_BYTES, cid_bytes_from_str
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.protocol.mst import iter_repo_records, walk_mst
from firehose.storage.prepare import records_json
from firehose.storage.rows import MAX_SANITIZE_DEPTH, rows_of

CI_EXAMPLES = 800  # per target: ~25 s for all the fuzz tests on a 2-core CI runner
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or CI_EXAMPLES)
SEED = os.environ.get("FUZZ_SEED")
# Per input, generous for a loaded 2-core runner: real inputs decode in microseconds to a
# few milliseconds (a 200 KB repo walk); a hang or a quadratic blow-up shows up as seconds.
DEADLINE = timedelta(milliseconds=1000)

F = TypeVar("F", bound=Callable[..., Any])


def fuzz_with(examples: int) -> Callable[[F], F]:
    """Hypothesis settings of every fuzz test: a fixed budget, reproducible by default."""

    def decorate(fn: F) -> F:
        configured = settings(
            max_examples=examples,
            derandomize=SEED is None,
            database=None,
            deadline=DEADLINE,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )(fn)
        return seed(int(SEED))(configured) if SEED is not None else configured

    return decorate


fuzz = fuzz_with(EXAMPLES)
# Generating nested hostile values costs hypothesis ~25 ms each (the mapping itself is
# microseconds): half the budget keeps this target's share of the CI time reasonable.
fuzz_values = fuzz_with(max(EXAMPLES // 2, 1))


@fuzz
@given(mutated(frame_seeds(), "frame"))
def test_fuzz_frames(data: bytes) -> None:
    fuzz_frame(data)


@fuzz
@given(mutated(car_seeds(), "car"))
def test_fuzz_car_whole_and_streaming(data: bytes) -> None:
    fuzz_car(data)


# The 8 repositories weigh as much as the 128 MST-only CARs: they carry commits and records.
MST_SEEDS = repo_cars() * 16 + mst_cars()


@fuzz
@given(mutated(MST_SEEDS, "car"))
def test_fuzz_mst_walk_and_snapshot(data: bytes) -> None:
    fuzz_mst(data)


# Window downloads (getRepo?since= partial trees, getRecord proofs): a quarter of the budget,
# the repositories only (they carry commits, profiles and records).
@fuzz_with(max(EXAMPLES // 4, 1))
@given(mutated(repo_cars(), "car"))
def test_fuzz_window_partial_walk_and_record_proofs(data: bytes) -> None:
    fuzz_window(data)


@fuzz
@given(mutated(record_seeds(), "cbor"))
def test_fuzz_record_decoder(data: bytes) -> None:
    fuzz_record(data)


# Handle checks (well-known bodies, DNS TXT records): tiny inputs, a quarter of the budget.
@fuzz_with(max(EXAMPLES // 4, 1))
@given(mutated(handle_answer_seeds(), "cbor"))
def test_fuzz_handle_answers(data: bytes) -> None:
    fuzz_handle_answer(data)


# --- the row mapper on values that never went through the decoder -------------------------

# Text as hostile as Python strings get: NUL, lone surrogates, astral characters, long runs.
HOSTILE_TEXT = st.text(
    st.characters(codec=None, exclude_categories=())
    | st.sampled_from("\x00\ud800\udfff\U0001f600"),
    max_size=40,
) | st.builds(lambda c, n: c * n, st.sampled_from("a\x00é\ud83d"), st.integers(900, 3000))
DATETIMES = st.sampled_from(
    [
        "2024-02-30T00:00:00Z",  # impossible date
        "2024-01-01T24:00:00Z",
        "2024-12-31T23:59:60Z",  # leap second
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",  # past year 9999 once in UTC
        "0001-01-01T00:00:00+23:59",  # before year 1 once in UTC
        "2024-01-01T00:00:00",  # no timezone
        "2024-01-01T00:00:00.123456789012345678Z",
        "2024-01-01T00:00:00.000Z",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | HOSTILE_TEXT
    | DATETIMES
)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(HOSTILE_TEXT, inner, max_size=6),
    max_leaves=40,
)
FIELDS = (
    "$type", "text", "langs", "reply", "root", "parent", "embed", "record", "media", "images",
    "external", "uri", "cid", "subject", "facets", "features", "did", "tag", "tags", "createdAt",
    "displayName", "description", "avatar", "banner", "ref", "$link", "name", "purpose", "list",
)  # fmt: skip


# Record-shaped dicts: the fields the mapper reads, filled with anything, arrays over the
# mapper's bound included.
SHAPED = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | HOSTILE_TEXT, inner, max_size=5)
    ),
    max_leaves=12,
)
# One array over the mapper's bound (repeating one value: nesting several would make the
# structure exponentially large, which no decoded record can be).
LONG_ARRAY = st.builds(lambda item, n: [item] * n, SCALARS, st.integers(101, 300))


def _nest(leaf: Any, levels: int, in_map: bool) -> Any:
    for _ in range(levels):
        leaf = {"a": leaf} if in_map else [leaf]
    return leaf


# Nesting past Python's recursion limit (the decoder stops at 64 levels; other callers of
# the mapper might not).
DEEP = st.builds(_nest, SCALARS, st.integers(60, 1500), st.booleans())
HOSTILE_RECORDS = st.dictionaries(st.sampled_from(FIELDS), SHAPED | LONG_ARRAY | DEEP, max_size=8)


@fuzz_values
@given(
    st.sampled_from(COLLECTIONS),
    HOSTILE_RECORDS | st.dictionaries(HOSTILE_TEXT, JSON_LIKE, max_size=6),
    st.sampled_from([None, "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"]),
)
def test_fuzz_row_mapper_on_hostile_values(
    collection: str, record: dict[str, Any], cid: str | None
) -> None:
    write = _write(collection, record)
    fuzz_rows(RecordWrite(write.did, collection, write.rkey, write.rev, Action.CREATE, cid, record))


@fuzz
@given(st.sampled_from(sorted(DISPATCH)), st.binary(max_size=512))
def test_fuzz_random_bytes_everywhere(target: str, data: bytes) -> None:
    DISPATCH[target](data)


# --- the corpus and the mutations are what they claim to be --------------------------------


def test_seeds_are_real_and_accepted() -> None:
    """The unmutated seeds decode: the fuzzing starts from valid, deep inputs."""
    # Two captured rev_ordering frames are malformed on purpose (see test_protocol_frames).
    events = [attempt(decode_frame, data) for data in frame_seeds()]
    assert sum(isinstance(e, ProtocolError) for e in events) == 2
    commits = [e for e in events if isinstance(e, CommitEvent)]
    assert len(commits) >= 25 and sum(len(c.writes) for c in commits) >= 25
    for data in repo_cars():
        _info, records = iter_repo_records(read_car(data))
        assert list(records)
    for data in mst_cars()[1:]:  # exhaustive_000 is the empty tree
        car = read_car(data)
        assert list(walk_mst(car.root_cid, car.blocks.get))
    assert len(car_seeds()) >= 135 and len(record_seeds()) >= 400


def test_rehash_mutation_passes_hash_checks_and_reaches_the_records() -> None:
    """A record block changed inside a repo CAR: the rebuilt CAR verifies, the MST leads to
    the new record, and the old block is gone, so mutations reach the inner decoders."""
    data = min(repo_cars(), key=len)
    car = read_car(data)
    _info, records = iter_repo_records(car)
    first = next(records)
    sections = car_sections(data)[1:]
    target = cid_bytes_from_str(first[2])
    index = next(i for i, (_, start, _) in enumerate(sections) if data.startswith(target, start))
    old_block = data[sections[index][1] + CID_BYTES : sections[index][2]]
    new_block = old_block.replace(b"$type", b"$typf")
    rebuilt, mapping = rehash_car(data, index, new_block)
    assert mapping and rebuilt != data
    new_car = read_car(rebuilt)  # every block hash-checks
    _info, new_records = iter_repo_records(new_car)
    decoded = [record for _, _, _, record in new_records]
    assert any("$typf" in record for record in decoded)


def test_inputs_are_counted() -> None:
    before = sum(TRIED.values())
    fuzz_frame(frame_seeds()[0])
    fuzz_car(car_seeds()[0])
    fuzz_mst(repo_cars()[0])
    fuzz_record(record_seeds()[0])
    assert TRIED["frames"] and TRIED["rows"]
    assert sum(TRIED.values()) > before + 4  # the frame's writes were mapped to rows too


def test_row_mapper_survives_nesting_deeper_than_the_recursion_limit() -> None:
    """Found by fuzzing the mapper: a value nested past Python's recursion limit (the
    decoder never produces one, other callers could) with a NUL in it made the JSON
    fallback raise RecursionError. Past MAX_SANITIZE_DEPTH levels values become null."""
    for leaf in ("nul \x00", "plain"):
        deep: Any = leaf
        for _ in range(5000):
            deep = [deep]
        write = _write("app.bsky.feed.post", {"text": "a", "deep": deep})
        fuzz_rows(write)
        record_row = rows_of(write, write.uri)
        assert record_row is not None
        value = json.loads(records_json([record_row[0]]))[0][6]["deep"]
        for _ in range(MAX_SANITIZE_DEPTH - 1):  # the record itself is the first level
            value = value[0]
        assert value is None
