"""Pure parts of the backfill's narrowing (issue 9): the cutoff as a rev, the dormant rule,
the listReposByCollection page parser and the enumeration plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backfill.window import Window
from firehose.protocol.syntax import make_tid, parse_tid

CUTOFF = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def tid_at(t: datetime, clock: int = 0) -> str:
    return make_tid((t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1), clock)


def test_since_is_the_greatest_tid_before_the_cutoff() -> None:
    w = Window(CUTOFF)
    assert w.since is not None
    micros, clock = parse_tid(w.since)
    assert clock == 1023
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros + 1) == CUTOFF
    assert w.since < tid_at(CUTOFF, 0)
    assert Window(None).since is None
    # A cutoff before 1970 asks for everything.
    assert Window(datetime(1960, 1, 1, tzinfo=UTC)).since == make_tid(0)


@pytest.mark.parametrize(
    ("offset", "clock", "dormant"),
    [
        (timedelta(microseconds=-1), 1023, True),  # one microsecond before, any clock id
        (timedelta(days=-400), 0, True),
        (timedelta(0), 0, False),  # at the cutoff: in the window
        (timedelta(0), 5, False),
        (timedelta(microseconds=1), 0, False),
        (timedelta(days=3), 7, False),
    ],
)
def test_dormant_is_exact_at_the_cutoff(offset: timedelta, clock: int, dormant: bool) -> None:
    w = Window(CUTOFF)
    rev = tid_at(CUTOFF + offset, clock)
    assert w.dormant(rev) is dormant
    # The rule agrees with the time the rev carries.
    assert (rev <= (w.since or "")) is dormant


def test_no_rev_or_whole_history_is_never_dormant() -> None:
    old = tid_at(CUTOFF - timedelta(days=100))
    assert not Window(CUTOFF).dormant(None)
    assert not Window(CUTOFF).dormant("not-a-tid")
    assert not Window(CUTOFF).dormant("")
    assert not Window(None).dormant(old)
