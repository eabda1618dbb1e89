"""DAG-CBOR encoding, CIDs and CAR v1 files, written independently of the worker's decoder.

The atproto data model (https://atproto.com/specs/data-model) uses the DAG-CBOR profile of
CBOR: map keys sorted length-first then bytewise (exactly cbor2's ``canonical=True`` order),
integers in their shortest form, no floats, and CID links as CBOR tag 42 whose payload is
``b"\\x00"`` (the multibase identity prefix) followed by the binary CID.

CIDs are CIDv1 with a sha2-256 multihash; the codec is dag-cbor (0x71) for blocks we encode
and raw (0x55) for blob references (https://atproto.com/specs/data-model#link-and-cid-formats).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Any

import cbor2

# Binary CIDv1 prefixes: version 1, codec, sha2-256 (0x12), digest length 32 (0x20).
CID_PREFIX_DAG_CBOR = b"\x01\x71\x12\x20"
CID_PREFIX_RAW = b"\x01\x55\x12\x20"
CBOR_TAG_CID = 42


def encode(value: Any) -> bytes:
    """Canonical DAG-CBOR bytes of `value` (dicts, lists, str, bytes, int, bool, None, links)."""
    return cbor2.dumps(value, canonical=True)


def encode_ordered(value: Any) -> bytes:
    """DAG-CBOR of a value whose dicts were built with their keys already in canonical order.

    cbor2's canonical mode sorts by encoding every key, which costs more than the rest of
    the encoding; the fixed-shape values of the hot path (commits, frame bodies) are written
    in order instead. The tests re-encode every frame with libipld to prove the order."""
    return cbor2.dumps(value)


def _head(major: int, n: int) -> bytes:
    """A CBOR initial byte + argument in its shortest form (RFC 8949 section 3)."""
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    return bytes([major << 5 | 26]) + n.to_bytes(4, "big")


# Heads of every major type for arguments below 256: the MST encoder's hot path.
_SMALL_HEADS = [[_head(major, n) for n in range(256)] for major in range(8)]
_NULL = b"\xf6"
_LINK_HEAD = b"\xd8\x2a\x58\x25\x00"  # tag 42, byte string of 37: 0x00 + 36-byte CID


def _link_bytes(cid: bytes | None) -> bytes:
    if cid is None:
        return _NULL
    if len(cid) == 36:
        return _LINK_HEAD + cid
    return b"\xd8\x2a" + _head(2, len(cid) + 1) + b"\x00" + cid


def encode_mst_entry(prefix: int, suffix: bytes, value: bytes, subtree: bytes | None) -> bytes:
    """DAG-CBOR of one MST entry ``{"k": suffix, "p": prefix, "t": subtree, "v": value}``."""
    return b"".join(
        (
            b"\xa4\x61k",
            _SMALL_HEADS[2][len(suffix)] if len(suffix) < 256 else _head(2, len(suffix)),
            suffix,
            b"\x61p",
            _SMALL_HEADS[0][prefix] if prefix < 256 else _head(0, prefix),
            b"\x61t",
            _link_bytes(subtree),
            b"\x61v",
            _link_bytes(value),
        )
    )


def encode_mst_node(left: bytes | None, entries: list[bytes]) -> bytes:
    """DAG-CBOR of an MST node ``{"e": [entries...], "l": left}``, written directly.

    MST nodes are most of what a commit encodes, and this fixed shape is several times
    faster by hand than through cbor2 (it also lets unchanged entries keep their bytes).
    `entries` come from `encode_mst_entry`. The tests check the result byte for byte
    against cbor2 and against real repositories."""
    return b"".join((b"\xa2\x61e", _head(4, len(entries)), *entries, b"\x61l", _link_bytes(left)))


def _text(value: str) -> bytes:
    raw = value.encode()
    return _head(3, len(raw)) + raw


def encode_commit(did: str, rev: str, data: bytes, version: int, sig: bytes | None) -> bytes:
    """DAG-CBOR of a repo commit ``{did, rev, sig?, data, prev: null, version}`` (keys in
    canonical order), written directly like MST nodes; `sig` None gives the unsigned form
    that is signed. Checked against cbor2 in the tests."""
    parts = [b"\xa6" if sig is not None else b"\xa5", b"\x63did", _text(did), b"\x63rev"]
    parts.append(_text(rev))
    if sig is not None:
        parts += (b"\x63sig", _head(2, len(sig)), sig)
    parts += (b"\x64data", _link_bytes(data), b"\x64prev", _NULL, b"\x67version")
    parts.append(_head(0, version))
    return b"".join(parts)


def cid_for_block(block: bytes) -> bytes:
    """Binary CIDv1 (dag-cbor, sha2-256) of an encoded block."""
    return CID_PREFIX_DAG_CBOR + hashlib.sha256(block).digest()


def cid_for_raw(data: bytes) -> bytes:
    """Binary CIDv1 (raw, sha2-256), the form atproto uses for blobs."""
    return CID_PREFIX_RAW + hashlib.sha256(data).digest()


def link(cid: bytes) -> cbor2.CBORTag:
    """A CID link as DAG-CBOR encodes it: tag 42 over the identity-multibase-prefixed CID."""
    return cbor2.CBORTag(CBOR_TAG_CID, b"\x00" + cid)


_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase
_B32_PAIRS = [_B32[i >> 5] + _B32[i & 31] for i in range(1024)]


def cid_str(cid: bytes) -> str:
    """The standard string form: multibase 'b' + lowercase RFC 4648 base32, no padding.

    Ten bits (two characters) per table lookup: `base64.b32encode` is pure Python and
    took most of the time of writing a truth file with a million records."""
    bits = len(cid) * 8
    pad_bits = -bits % 10
    n = int.from_bytes(cid, "big") << pad_bits
    chars = "".join([_B32_PAIRS[(n >> s) & 1023] for s in range(bits + pad_bits - 10, -1, -10)])
    return "b" + chars[: (bits + 4) // 5]


def cid_from_str(text: str) -> bytes:
    """Inverse of `cid_str` (base32 only, which is all atproto uses)."""
    if not text.startswith("b"):
        raise ValueError(f"not a base32 CID: {text!r}")
    body = text[1:].upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def encode_block(value: Any) -> tuple[bytes, bytes]:
    """Encode `value` and return ``(cid, block_bytes)``."""
    block = encode(value)
    return cid_for_block(block), block


def varint(n: int) -> bytes:
    """Unsigned LEB128, the varint of multiformats and of CAR section lengths."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def car_header(roots: Iterable[bytes]) -> bytes:
    """CAR v1 header section: varint length + DAG-CBOR {version: 1, roots: [links]}."""
    links = [_link_bytes(cid) for cid in roots]
    # {"roots": [...], "version": 1}: "roots" sorts before "version" (same length rule)
    header = b"".join((b"\xa2\x65roots", _head(4, len(links)), *links, b"\x67version\x01"))
    return varint(len(header)) + header


def car_section(cid: bytes, block: bytes) -> bytes:
    """One CAR v1 block section: varint(len(cid) + len(block)) + cid + block."""
    return varint(len(cid) + len(block)) + cid + block


def write_car(root: bytes, blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A CAR v1 with one root and the given ``(cid, block)`` sections, in order."""
    parts = [car_header([root])]
    parts.extend(car_section(cid, block) for cid, block in blocks)
    return b"".join(parts)
