"""backfill.window: which records a BACKFILL_DAYS window keeps (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill.window import Window, record_time
from firehose.protocol.syntax import MAX_TID_MICROS, make_tid

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
WEEK = Window.from_days(7, NOW)


def tid_at(when: datetime, clock_id: int = 0) -> str:
    return make_tid(int(when.timestamp() * 1_000_000), clock_id)


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def test_from_days() -> None:
    assert WEEK.cutoff == NOW - timedelta(days=7)
    assert Window.from_days(-1, NOW).cutoff is None
    assert Window.from_days(-1, NOW).whole_history
    with pytest.raises(ValueError):
        Window.from_days(-2, NOW)
    with pytest.raises(ValueError):
        Window(datetime(2025, 1, 1))  # naive


def test_tid_rkey_decides_without_the_record() -> None:
    recent, old = tid_at(NOW - timedelta(days=1)), tid_at(NOW - timedelta(days=8))
    assert WEEK.rkey_verdict(recent) is True
    assert WEEK.rkey_verdict(old) is False
    assert WEEK.keeps(recent, None)
    assert not WEEK.keeps(old, None)
    # The TID wins over createdAt: the rkey is what the repo's MST orders by.
    assert not WEEK.keeps(old, {"createdAt": iso(NOW)})
    # Exactly at the cutoff is inside.
    assert WEEK.rkey_verdict(tid_at(WEEK.cutoff)) is True  # type: ignore[arg-type]


def test_created_at_fallback() -> None:
    assert WEEK.rkey_verdict("self") is None
    assert WEEK.keeps("self", {"createdAt": iso(NOW - timedelta(days=1))})
    assert not WEEK.keeps("self", {"createdAt": iso(NOW - timedelta(days=30))})
    # Other offsets compare as instants.
    plus2 = (NOW - timedelta(days=8)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert not WEEK.keeps("self", {"createdAt": plus2})
    assert WEEK.rkey_verdict("zzzzzzzzzzzzz") is None  # 13 chars but the top bit is set


def test_neither_is_kept() -> None:
    assert WEEK.keeps("self", None)
    assert WEEK.keeps("self", {})
    assert WEEK.keeps("self", {"createdAt": "yesterday"})
    assert WEEK.keeps("self", {"createdAt": 12345})
    assert WEEK.keeps("self", {"createdAt": "2025-13-01T00:00:00Z"})


def test_whole_history_keeps_everything() -> None:
    window = Window.from_days(-1, NOW)
    assert window.rkey_verdict(tid_at(datetime(2000, 1, 1, tzinfo=UTC))) is True
    assert window.rkey_verdict("self") is True
    assert window.keeps("self", {"createdAt": "1970-01-01T00:00:00Z"})


def test_record_time() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert record_time(tid_at(when), None) == when
    assert record_time("self", {"createdAt": "2024-05-06T07:08:09.123Z"}) == datetime(
        2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC
    )
    assert record_time("self", None) is None
    assert record_time("self", {"createdAt": None}) is None


RKEYS = st.one_of(
    st.builds(
        make_tid,
        st.integers(0, MAX_TID_MICROS // 1000),  # TID times up to ~2255, like real data
        st.integers(0, 1023),
    ),
    st.sampled_from(
        ["self", "3jzfcijpj2z2a", "app.bsky.feed.post", "a" * 13, "~", "2222222222222"]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=20),
)
CREATED = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=30),
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ).map(iso),
)
RECORDS = st.one_of(st.none(), st.builds(lambda c: {} if c is None else {"createdAt": c}, CREATED))
WINDOWS = st.one_of(
    st.just(Window(None)),
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ).map(Window),
)


@given(rkey=RKEYS, record=RECORDS, window=WINDOWS)
def test_keeps_agrees_with_record_time(rkey: str, record: dict | None, window: Window) -> None:
    when = record_time(rkey, record)
    expected = window.cutoff is None or when is None or when >= window.cutoff
    assert window.keeps(rkey, record) is expected
    verdict = window.rkey_verdict(rkey)
    if verdict is not None:
        # An rkey verdict is final: the record cannot change it.
        assert verdict is window.keeps(rkey, record)
        assert verdict is window.keeps(rkey, None)


def test_the_profile_is_current_state_kept_whatever_its_date() -> None:
    # Issue 9: every backfilled account has its current profile, however old it is.
    old = {"createdAt": iso(NOW - timedelta(days=400))}
    assert WEEK.keeps("self", old, "app.bsky.actor.profile")
    assert not WEEK.keeps("self", old, "app.bsky.actor.status")
    assert not WEEK.keeps("self", old)
