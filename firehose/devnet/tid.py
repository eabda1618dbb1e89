"""Timestamp identifiers (TIDs), used as repo revs and record keys.

Spec (https://atproto.com/specs/tid): 64 bits, top bit 0, then 53 bits of microseconds since
the UNIX epoch, then 10 bits of clock id; written as 13 characters of the "base32-sortable"
alphabet so that string order equals numeric order.
"""

from __future__ import annotations

import base64

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
TID_LENGTH_CHARS = 13
CLOCK_ID_BITS = 10
CLOCK_ID_MASK = (1 << CLOCK_ID_BITS) - 1
MAX_MICROS = (1 << 53) - 1
# RFC 4648 base32 and base32-sortable split bits identically; only the alphabets differ.
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", TID_ALPHABET)


def tid(micros: int, clock_id: int) -> str:
    """The TID for `micros` (since the epoch) and `clock_id` (0..1023)."""
    if not 0 <= micros <= MAX_MICROS:
        raise ValueError(f"timestamp out of TID range: {micros} µs")
    value = (micros << CLOCK_ID_BITS) | (clock_id & CLOCK_ID_MASK)
    # 10 bytes = 16 base32 characters; the last 13 carry the low 65 bits, i.e. the TID.
    text = base64.b32encode(value.to_bytes(10, "big")).decode("ascii")
    return text[-TID_LENGTH_CHARS:].translate(_FROM_RFC4648)


def tid_micros(text: str) -> int:
    """Microseconds since the epoch encoded in a TID (inverse of `tid` for the time part)."""
    value = 0
    for char in text:
        value = (value << 5) | TID_ALPHABET.index(char)
    return value >> CLOCK_ID_BITS
