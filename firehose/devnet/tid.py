"""Timestamp identifiers (TIDs), used as repo revs and record keys.

Spec (https://atproto.com/specs/tid): 64 bits, top bit 0, then 53 bits of microseconds since
the UNIX epoch, then 10 bits of clock id; written as 13 characters of the "base32-sortable"
alphabet so that string order equals numeric order.
"""

from __future__ import annotations

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
TID_LENGTH_CHARS = 13
CLOCK_ID_BITS = 10
CLOCK_ID_MASK = (1 << CLOCK_ID_BITS) - 1
MAX_MICROS = (1 << 53) - 1
_PAIRS = [TID_ALPHABET[i >> 5] + TID_ALPHABET[i & 31] for i in range(1024)]


def tid(micros: int, clock_id: int) -> str:
    """The TID for `micros` (since the epoch) and `clock_id` (0..1023)."""
    if not 0 <= micros <= MAX_MICROS:
        raise ValueError(f"timestamp out of TID range: {micros} µs")
    return tid_of_value((micros << CLOCK_ID_BITS) | (clock_id & CLOCK_ID_MASK))


def tid_of_value(value: int) -> str:
    """The 13 characters of a 64-bit TID value (string order = numeric order)."""
    if not 0 <= value < 1 << 63:
        raise ValueError(f"not a TID value: {value}")
    # 1 character for the top 5 of 65 bits, then six 10-bit pairs from a lookup table.
    pairs = _PAIRS
    return (
        TID_ALPHABET[value >> 60]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


# base32-sortable digit -> the digit int(..., 32) reads at the same value ("2" -> "0", ...)
_TO_BASE32_DIGITS = str.maketrans(TID_ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def tid_micros(text: str) -> int:
    """Microseconds since the epoch encoded in a TID (inverse of `tid` for the time part)."""
    if len(text) != TID_LENGTH_CHARS or text.strip(TID_ALPHABET):
        raise ValueError(f"not a TID: {text!r}")
    return int(text.translate(_TO_BASE32_DIGITS), 32) >> CLOCK_ID_BITS
