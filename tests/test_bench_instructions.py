"""bench/instructions.py: instructions per frame, event and record, counted by callgrind."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.instructions import (
    FIXTURE_CAR,
    WARM_FRAMES,
    instructions,
    run_apply,
    run_batch,
    run_car,
    run_decode,
    run_snapshot,
)
from firehose.devnet.generator import Generator
from firehose.model import CommitEvent
from firehose.protocol.frames import decode_frame

FIXTURE_RECORDS = 38  # the records of FIXTURE_CAR (tests/backfill_support.py)


def _frames(count: int) -> list[bytes]:
    generator = Generator(seed=3, accounts=20)
    return [generator.next_frame() for _ in range(count)]


def test_workloads_do_the_items_asked() -> None:
    frames = _frames(40)
    assert run_decode(frames) == 40
    events = [decode_frame(f) for f in frames]
    assert any(isinstance(e, CommitEvent) and e.writes for e in events)
    assert run_batch(events) == 40
    car = FIXTURE_CAR.read_bytes()
    # More records than the repo holds: it is streamed and walked again.
    assert run_car(car, FIXTURE_RECORDS + 5) == FIXTURE_RECORDS + 5
    assert run_snapshot(car, FIXTURE_RECORDS + 5) == FIXTURE_RECORDS + 5


async def test_apply_writes_the_events_it_counts(db_dsn: str, conn: asyncpg.Connection) -> None:
    events = [decode_frame(f) for f in _frames(WARM_FRAMES + 60)]
    # uvloop.run, as in the child: on a thread of its own, beside the test's loop.
    assert await asyncio.to_thread(run_apply, db_dsn, events) == 60
    cursor = await conn.fetchval("SELECT cursor FROM firehose_cursor WHERE service = 'firehose'")
    assert cursor == max(e.seq for e in events if hasattr(e, "seq"))
    assert await conn.fetchval("SELECT count(*) FROM records") > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_counts_are_the_same_run_to_run_and_grow_with_the_items() -> None:
    prepared = 200
    none = instructions("car", 0, prepared)
    some = instructions("car", 20, prepared)
    again = instructions("car", 20, prepared)
    assert some == again  # PYTHONHASHSEED=0: the ruler does not move
    # A record costs thousands of instructions (stream, hash, walk, decode), not millions.
    assert 1_000 < (some - none) / 20 < 1_000_000


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_a_failed_child_is_an_error_with_its_output() -> None:
    with pytest.raises(RuntimeError, match="invalid choice"):
        instructions("no-such-workload", 1, 200)
