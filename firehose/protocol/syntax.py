"""atproto identifier syntax (https://atproto.com/specs/...): TID, record key, NSID, DID,
handle, AT-URI and datetime. Validation is by the specs' regular expressions and length
limits; the interop test lists (atproto-interop-tests/syntax) are the tests.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

# https://atproto.com/specs/tid : 13 chars of base32-sortable; the top bit is 0, so the
# first char is in the lower half of the alphabet. 53 bits of microseconds since the UNIX
# epoch, then 10 bits of clock id.
TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
TID_CHARS = 13
_TID_RE = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_TID_VALUE = {c: i for i, c in enumerate(TID_ALPHABET)}
TID_CLOCK_ID_BITS = 10
MAX_TID_MICROS = (1 << 53) - 1

# https://atproto.com/specs/record-key
RECORD_KEY_MAX_CHARS = 512
_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")

# https://atproto.com/specs/nsid : reversed domain authority + name; name has no digits
# first and no hyphens. 317 chars total (253 domain + 1 + 63 name).
NSID_MAX_CHARS = 317
_NSID_RE = re.compile(
    r"[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)

# https://atproto.com/specs/did : method lowercase letters; 2 KiB cap.
DID_MAX_CHARS = 2048
_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")

# https://atproto.com/specs/handle : DNS hostname, >= 2 labels, TLD starts with a letter.
HANDLE_MAX_CHARS = 253
_HANDLE_RE = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+"
    r"[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)

# An open enum value of a lexicon (`knownValues`, e.g. #account `status`: takendown,
# suspended, deleted, deactivated, desynchronized, throttled): kept when unknown (forward
# compatibility) but only as a short token. A free string would reach PostgreSQL as is, and
# one NUL in it fails the whole batch transaction, which then retries for ever (issue 5).
TOKEN_MAX_CHARS = 64
_TOKEN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")

# https://atproto.com/specs/at-uri-scheme : restricted form at://authority[/nsid[/rkey]].
AT_URI_MAX_CHARS = 8 * 1024

# https://atproto.com/specs/lexicon#datetime : RFC 3339 with mandatory seconds and timezone
# (upper-case T and Z), no "-00:00", at most 64 chars.
DATETIME_MAX_CHARS = 64
_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    # Offset minutes 00..59: timedelta would read "+00:60" as one hour (issue 5, hygiene).
    r"(Z|[+-][0-9]{2}:[0-5][0-9])"
)

_DATETIME_MS_Z = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_fromisoformat = datetime.fromisoformat


def is_tid(text: str) -> bool:
    return len(text) == TID_CHARS and _TID_RE.fullmatch(text) is not None


def parse_tid(text: str) -> tuple[int, int]:
    """TID -> (microseconds since the UNIX epoch, clock id). ValueError if invalid."""
    if not is_tid(text):
        raise ValueError(f"invalid TID {text[:20]!r}")
    value = 0
    for char in text:
        value = (value << 5) | _TID_VALUE[char]
    return value >> TID_CLOCK_ID_BITS, value & ((1 << TID_CLOCK_ID_BITS) - 1)


def make_tid(micros: int, clock_id: int = 0) -> str:
    """(microseconds, clock id) -> TID, the inverse of `parse_tid`."""
    if not 0 <= micros <= MAX_TID_MICROS or not 0 <= clock_id < (1 << TID_CLOCK_ID_BITS):
        raise ValueError("TID out of range")
    value = (micros << TID_CLOCK_ID_BITS) | clock_id
    return "".join(TID_ALPHABET[(value >> (5 * i)) & 31] for i in range(TID_CHARS - 1, -1, -1))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tid_to_datetime(text: str) -> datetime:
    """The timestamp a TID carries, as an aware UTC datetime. ValueError if invalid."""
    micros, _clock = parse_tid(text)
    return _EPOCH + timedelta(microseconds=micros)


def is_record_key(text: str) -> bool:
    if text.isascii() and text.isalnum() and len(text) <= RECORD_KEY_MAX_CHARS:
        # Letters and digits only (a TID, `self`): nearly every key, without the regex
        # (40 against 200 ns; every record of a backfill and every op of the live stream).
        return True
    return (
        len(text) <= RECORD_KEY_MAX_CHARS
        and _RKEY_RE.fullmatch(text) is not None
        and text not in (".", "..")
    )


def is_nsid(text: str) -> bool:
    return len(text) <= NSID_MAX_CHARS and _NSID_RE.fullmatch(text) is not None


def is_did(text: str) -> bool:
    return len(text) <= DID_MAX_CHARS and _DID_RE.fullmatch(text) is not None


def is_handle(text: str) -> bool:
    return len(text) <= HANDLE_MAX_CHARS and _HANDLE_RE.fullmatch(text) is not None


def is_token(text: str) -> bool:
    return len(text) <= TOKEN_MAX_CHARS and _TOKEN_RE.fullmatch(text) is not None


def is_at_uri(text: str) -> bool:
    """The restricted AT-URI form used in records: at://authority[/collection[/rkey]]."""
    if len(text) > AT_URI_MAX_CHARS or not text.startswith("at://"):
        return False
    parts = text[5:].split("/")
    if len(parts) > 3:
        return False
    authority = parts[0]
    if not (is_did(authority) or is_handle(authority)):
        return False
    if len(parts) >= 2 and not is_nsid(parts[1]):
        return False
    return len(parts) < 3 or is_record_key(parts[2])


def is_datetime(text: str) -> bool:
    """Valid atproto datetime *syntax* (it may still fail to parse, e.g. month 13)."""
    return (
        len(text) <= DATETIME_MAX_CHARS
        and _DATETIME_RE.fullmatch(text) is not None
        and not text.endswith("-00:00")
    )


def parse_datetime(text: str) -> datetime | None:
    """atproto datetime -> aware datetime, or None if invalid (syntax or calendar)."""
    if type(text) is not str or len(text) > DATETIME_MAX_CHARS:
        return None
    if len(text) == 24 and text[23] == "Z" and _DATETIME_MS_Z.fullmatch(text) is not None:
        # The common JS form "YYYY-MM-DDTHH:MM:SS.sssZ": fromisoformat is ~4x faster.
        try:
            return _fromisoformat(text)
        except ValueError:
            return None
    m = _DATETIME_RE.fullmatch(text)
    if m is None or text.endswith("-00:00"):
        return None
    year, month, day, hour, minute, second, frac, tz = m.groups()
    micros = int((frac[1:] + "00000")[:6]) if frac else 0
    try:
        if tz == "Z":
            tzinfo: timezone = UTC
        else:
            hours, minutes = int(tz[1:3]), int(tz[4:6])
            offset = timedelta(hours=hours, minutes=minutes)
            tzinfo = timezone(-offset if tz[0] == "-" else offset)
        # Year 0000 is valid RFC 3339 but has no Python datetime: treated as unparseable.
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo
        )
    except (ValueError, OverflowError):
        return None
