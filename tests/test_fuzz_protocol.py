"""Property fuzzing: mutated real frames, CARs, records and MSTs give a value or a
ProtocolError (never another exception), quickly. Fixed budgets, derandomized, no database
of examples, so the file runs in a few seconds and the same way every time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol_support import FIXTURES, REPO_CARS, commit_bodies, frame, relay_frames

from firehose.protocol.car import CarStreamReader, read_car
from firehose.protocol.cbor import decode_json_form, decode_record
from firehose.protocol.errors import REASONS, ProtocolError
from firehose.protocol.frames import decode_frame
from firehose.protocol.mst import iter_repo_records

FRAMES = relay_frames() + [frame({"op": 1, "t": "#commit"}, b) for _, b in commit_bodies()]
CARS = [(FIXTURES / name).read_bytes() for name in REPO_CARS if "fakermaker" not in name]
RECORDS = [
    (FIXTURES / "indigo/testing/testdata/feedpost_record.cbor").read_bytes(),
    (FIXTURES / "indigo/testing/testdata/post_richtext_link.cbor").read_bytes(),
]
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
MAX_SECONDS = 1.0  # per example; real decodes take microseconds


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "random"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            return draw(st.binary(max_size=256))
    return bytes(data)


def outcome(fn: Callable[[bytes], Any], data: bytes) -> None:
    start = time.perf_counter()
    try:
        fn(data)
    except ProtocolError as err:
        assert err.reason in REASONS and len(err.detail) <= 200
    assert time.perf_counter() - start < MAX_SECONDS


@FUZZ
@given(mutated(FRAMES))
def test_fuzz_decode_frame(data: bytes) -> None:
    outcome(decode_frame, data)


@FUZZ
@given(mutated(CARS))
def test_fuzz_read_car_and_stream(data: bytes) -> None:
    outcome(read_car, data)

    def stream(buf: bytes) -> None:
        reader = CarStreamReader()
        for i in range(0, len(buf), 97):
            reader.feed(buf[i : i + 97])
        reader.close()

    outcome(stream, data)


@FUZZ
@given(mutated(RECORDS))
def test_fuzz_record_decoder(data: bytes) -> None:
    outcome(decode_record, data)
    outcome(lambda d: decode_json_form(d, 8), data)


@FUZZ
@given(mutated(CARS))
def test_fuzz_walk_mst(data: bytes) -> None:
    def walk(buf: bytes) -> None:
        _info, records = iter_repo_records(read_car(buf))
        for _ in records:
            pass

    outcome(walk, data)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_everywhere(data: bytes) -> None:
    for fn in (decode_frame, read_car, decode_record):
        outcome(fn, data)
