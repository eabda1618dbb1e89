"""Identifier syntax against the atproto interop lists (interop-tests/syntax)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocol_support import FIXTURES

from firehose.protocol import syntax

CHECKS: dict[str, Callable[[str], bool]] = {
    "did": syntax.is_did,
    "handle": syntax.is_handle,
    "nsid": syntax.is_nsid,
    "aturi": syntax.is_at_uri,
    "tid": syntax.is_tid,
    "recordkey": syntax.is_record_key,
    "datetime": syntax.is_datetime,
}


def cases(name: str) -> list[str]:
    path = FIXTURES / "interop-tests/syntax" / name
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("kind", CHECKS)
def test_valid_and_invalid_lists(kind: str) -> None:
    check = CHECKS[kind]
    valid, invalid = cases(f"{kind}_syntax_valid.txt"), cases(f"{kind}_syntax_invalid.txt")
    assert valid and invalid
    assert [v for v in valid if not check(v)] == []
    assert [v for v in invalid if check(v)] == []


def test_datetime_parsing() -> None:
    # Year 0000 is valid syntax but has no Python datetime: it parses to None (documented).
    unparseable = [
        v for v in cases("datetime_syntax_valid.txt") if syntax.parse_datetime(v) is None
    ]
    assert unparseable == ["0000-01-01T00:00:00.000Z"]
    for value in cases("datetime_parse_invalid.txt") + cases("datetime_syntax_invalid.txt"):
        assert syntax.parse_datetime(value) is None
    parsed = syntax.parse_datetime("1985-04-12T23:20:50.123456789+01:30")
    assert parsed is not None and parsed.utcoffset() is not None
    assert parsed.astimezone(UTC) == datetime(1985, 4, 12, 21, 50, 50, 123456, tzinfo=UTC)


def test_tid_round_trip() -> None:
    micros = 1_700_000_000_123_456
    tid = syntax.make_tid(micros, 17)
    assert syntax.is_tid(tid) and syntax.parse_tid(tid) == (micros, 17)
    assert syntax.tid_to_datetime(tid) == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert syntax.make_tid(0) == "2222222222222"
    # TIDs sort like their timestamps.
    assert syntax.make_tid(micros) < syntax.make_tid(micros + 1)
    for bad in ("", "3jzfcijpj2z2", "0000000000000", "3jzfcijpj2z2aa"):
        with pytest.raises(ValueError):
            syntax.parse_tid(bad)
    with pytest.raises(ValueError):
        syntax.make_tid(1 << 53)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=600) | st.text("aZ9.~", max_size=3))
@settings(max_examples=500)
def test_a_record_key_is_the_specs_rule(text: str) -> None:
    """Property: the letters-and-digits shortcut of is_record_key agrees with the spec's
    rule (1-512 of A-Za-z0-9 . _ : ~ -, not "." or "..") on any text: non-ASCII letters and
    digits (which str.isalnum accepts) and keys over 512 characters included."""
    rule = re.fullmatch(r"[A-Za-z0-9._:~-]{1,512}", text) is not None and text not in (".", "..")
    assert syntax.is_record_key(text) == rule
    assert syntax.is_record_key("3k" * 256) and not syntax.is_record_key("3k" * 256 + "a")
    assert not syntax.is_record_key("é") and not syntax.is_record_key("٣")
