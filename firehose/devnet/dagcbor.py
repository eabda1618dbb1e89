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


def cid_for_block(block: bytes) -> bytes:
    """Binary CIDv1 (dag-cbor, sha2-256) of an encoded block."""
    return CID_PREFIX_DAG_CBOR + hashlib.sha256(block).digest()


def cid_for_raw(data: bytes) -> bytes:
    """Binary CIDv1 (raw, sha2-256), the form atproto uses for blobs."""
    return CID_PREFIX_RAW + hashlib.sha256(data).digest()


def link(cid: bytes) -> cbor2.CBORTag:
    """A CID link as DAG-CBOR encodes it: tag 42 over the identity-multibase-prefixed CID."""
    return cbor2.CBORTag(CBOR_TAG_CID, b"\x00" + cid)


def cid_str(cid: bytes) -> str:
    """The standard string form: multibase 'b' + lowercase RFC 4648 base32, no padding."""
    return "b" + base64.b32encode(cid).decode("ascii").rstrip("=").lower()


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
    header = encode({"version": 1, "roots": [link(cid) for cid in roots]})
    return varint(len(header)) + header


def car_section(cid: bytes, block: bytes) -> bytes:
    """One CAR v1 block section: varint(len(cid) + len(block)) + cid + block."""
    return varint(len(cid) + len(block)) + cid + block


def write_car(root: bytes, blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A CAR v1 with one root and the given ``(cid, block)`` sections, in order."""
    parts = [car_header([root])]
    parts.extend(car_section(cid, block) for cid, block in blocks)
    return b"".join(parts)
