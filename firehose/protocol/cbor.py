"""Strict DAG-CBOR decoding, and records -> the atproto JSON form.

Two decoders, chosen by what the caller needs:

* `decode_block` / `decode_multi` wrap libipld (Rust, ~1 us) for objects whose schema we
  know: frame header and body, commit objects, MST nodes. libipld returns CID links as the
  binary CID in a ``bytes`` value, indistinguishable from a byte string, so callers only
  read a value as a CID where the schema says it is a link (`commit`, `data`, `l`, `v`...).
  libipld is lenient about a few DAG-CBOR rules (non-minimal integer/length encodings,
  CIDs other than v1/sha2-256), which is harmless for these known-shape objects since we
  re-validate every CID we use.

* `decode_record` is our own strict decoder for records, whose shape is arbitrary user
  data: it keeps links and bytes apart and builds the atproto JSON form in one pass
  (https://atproto.com/specs/data-model#json-representation): links become
  ``{"$link": "bafy..."}``, bytes ``{"$bytes": base64 without padding}``. It enforces the
  DAG-CBOR spec (https://ipld.io/specs/codecs/dag-cbor/spec/#strictness): minimal-length
  integers and lengths, no indefinite lengths, only tag 42 (a CIDv1 in atproto's blessed
  form), text-only map keys sorted length-first then bytewise with no duplicates, only
  false/true/null simple values, floats only as 64-bit and never NaN/Infinity/-0, valid
  UTF-8, exactly one top-level object. Nesting is bounded (`MAX_RECORD_DEPTH`) so hostile
  input cannot exhaust the stack. Any ``\\u0000`` in a string or key becomes U+FFFD and the
  caller is told (``sanitized``): PostgreSQL text/jsonb cannot hold NUL.

  Invalid UTF-8 (a lone surrogate such as ED A0 80, a stray FF) is NOT repaired: the record
  is invalid (reason ``cbor``; the live path counts and skips that op, the backfill skips
  that record). DAG-CBOR and the atproto data model require valid UTF-8; the record's CID
  hashes the bad bytes, so a repaired copy would be content nobody signed; and the strict
  decoders (libipld, serde_ipld_dagcbor) refuse it too, so a conforming PDS does not
  produce it. NUL is valid UTF-8, hence kept (replaced) instead.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import libipld

from firehose.protocol.cid import CID_BYTES, SUPPORTED_PREFIXES, cid_str_from_bytes
from firehose.protocol.cid import _encode_cid as _encode_cid
from firehose.protocol.errors import CborError, ProtocolError, describe

# Records nest shallowly (a post with an embed with a record-with-media is ~8 levels);
# 64 leaves ample room for real data while keeping the recursion far from Python's limit.
MAX_RECORD_DEPTH = 64

_b64encode = base64.b64encode
_unpack_f64 = struct.Struct(">d").unpack_from
_from_bytes = int.from_bytes
_isfinite = math.isfinite
_NUL = "\x00"
_REPLACEMENT = "\ufffd"
# Minimal value for each "additional info" length form (RFC 8949 s4.2.1 / DAG-CBOR strictness).
_MIN_FOR_INFO = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x100000000}
_TAG_CID = 42
_MAJOR_BYTES = 2  # CBOR major type of a byte string
_encode_dag_cbor = libipld.encode_dag_cbor
_CID_TAG_BYTES = CID_BYTES + 1  # tag 42 payload: 0x00 multibase prefix + binary CID


def decode_block(data: bytes) -> Any:
    """libipld decode of one DAG-CBOR object of known schema; ProtocolError on bad input."""
    try:
        return libipld.decode_dag_cbor(data)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise CborError(describe(exc)) from None


def decode_multi(data: bytes) -> list[Any]:
    """libipld decode of concatenated DAG-CBOR objects (a frame: header then body)."""
    try:
        return libipld.decode_dag_cbor_multi(data)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise CborError(describe(exc)) from None


def decode_record(data: bytes, max_depth: int = MAX_RECORD_DEPTH) -> tuple[dict[str, Any], bool]:
    """Strictly decode a record block to its JSON form. Returns ``(record, sanitized)``."""
    value, sanitized = decode_json_form(data, max_depth)
    if type(value) is not dict:
        raise CborError(f"record is a {type(value).__name__}, not a map")
    return value, sanitized


def decode_json_form(data: bytes, max_depth: int = MAX_RECORD_DEPTH) -> tuple[Any, bool]:
    """Strictly decode one DAG-CBOR object (any type) to the atproto JSON form.

    Fast path (~3 us for a post): libipld decodes, and re-encoding with libipld must give
    the input back byte for byte. libipld checks key order, duplicates, tags, floats,
    simple values, UTF-8 and trailing bytes itself; the byte-exact round trip adds the
    minimal-encoding rule, and proves that exactly the byte strings libipld's encoder
    takes for CIDs were links in the input: a 36-byte value with a supported CID prefix
    is a link, a value the encoder writes as a byte string was a byte string, and any
    other (a link to a CID we do not accept) is left to `_strict_decode`. Every input the
    fast path does not settle (invalid data, odd CIDs) goes to the pure-Python strict
    decoder, which is the reference: both must agree (tested).
    """
    flags = [False]
    try:
        value = libipld.decode_dag_cbor(data)
        if libipld.encode_dag_cbor(value) == data:
            return _walk(value, max_depth, flags), flags[0]
    except (_Fallback, ValueError, TypeError, OverflowError, RecursionError, MemoryError):
        pass
    flags[0] = False
    return _strict_decode(data, max_depth, flags), flags[0]


class _Fallback(Exception):
    """The fast path cannot decide this input; use the strict decoder."""


def _walk(value: Any, depth: int, flags: list[bool]) -> Any:
    """Turn a libipld value (validated, canonical) into the JSON form, in place."""
    t = type(value)
    if t is dict:
        if depth <= 0:
            raise CborError("nesting too deep")
        depth -= 1
        rebuild = False
        for key, item in value.items():
            ti = type(item)
            if ti is str:
                if _NUL in item:
                    value[key] = item.replace(_NUL, _REPLACEMENT)
                    flags[0] = True
            elif ti is dict or ti is list or ti is bytes:
                value[key] = _walk(item, depth, flags)
            if _NUL in key:
                rebuild = True
        if rebuild:
            flags[0] = True
            value = {k.replace(_NUL, _REPLACEMENT): v for k, v in value.items()}
        return value
    if t is list:
        if depth <= 0:
            raise CborError("nesting too deep")
        depth -= 1
        i = 0
        for item in value:
            ti = type(item)
            if ti is str:
                if _NUL in item:
                    value[i] = item.replace(_NUL, _REPLACEMENT)
                    flags[0] = True
            elif ti is dict or ti is list or ti is bytes:
                value[i] = _walk(item, depth, flags)
            i += 1  # noqa: SIM113 (enumerate is slower on this hot path)
        return value
    if t is bytes:
        if len(value) == CID_BYTES and value[:4] in SUPPORTED_PREFIXES:
            return {"$link": _encode_cid(value)}
        # Not a CID we accept. The input re-encoded byte for byte, so this value was spelled
        # the way libipld's encoder spells it: if the encoder writes it as a byte string
        # (major type 2), the input had a byte string here, never a link; if it writes a
        # tag 42, the input held a link to a CID we do not accept, which the strict decoder
        # rejects with its precise reason.
        if _encode_dag_cbor(value)[0] >> 5 == _MAJOR_BYTES:
            return {"$bytes": _b64encode(value).decode("ascii").rstrip("=")}
        raise _Fallback
    if t is str and _NUL in value:
        flags[0] = True
        return value.replace(_NUL, _REPLACEMENT)
    return value


def _strict_decode(data: bytes, max_depth: int, flags: list[bool]) -> Any:
    """The reference strict decoder (pure Python, ~10x slower than the fast path)."""
    try:
        value, pos = _item(data, 0, max_depth, flags)
    except ProtocolError:
        raise
    except IndexError:
        raise CborError("truncated") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise CborError(describe(exc)) from None
    if pos != len(data):
        raise CborError(f"{len(data) - pos} trailing bytes after the object")
    return value


def _item(data: bytes, pos: int, depth: int, flags: list[bool]) -> tuple[Any, int]:
    ib = data[pos]
    major = ib >> 5
    info = ib & 0x1F
    pos += 1
    if info < 24:
        arg = info
    elif info < 28:
        if major == 7:
            if info != 27:
                raise CborError("floats must be 64-bit")
            if pos + 8 > len(data):
                raise CborError("truncated float")
            f = _unpack_f64(data, pos)[0]
            if not _isfinite(f) or (f == 0.0 and math.copysign(1.0, f) < 0):
                raise CborError("NaN, Infinity and -0 are not allowed")
            return f, pos + 8
        size = 1 << (info - 24)
        end = pos + size
        if end > len(data):
            raise CborError("truncated header")
        arg = _from_bytes(data[pos:end], "big")
        if arg < _MIN_FOR_INFO[info]:
            raise CborError("non-minimal integer or length")
        pos = end
    else:
        raise CborError("indefinite length or reserved header")

    if major == 3:
        end = pos + arg
        if end > len(data):
            raise CborError("truncated string")
        s = data[pos:end].decode("utf-8")
        if _NUL in s:
            s = s.replace(_NUL, _REPLACEMENT)
            flags[0] = True
        return s, end
    if major == 5:
        if depth <= 0:
            raise CborError("nesting too deep")
        if arg > len(data) - pos:
            raise CborError("truncated map")
        out: dict[str, Any] = {}
        prev = None
        for _ in range(arg):
            kb = data[pos]
            if kb >> 5 != 3:
                raise CborError("map keys must be strings")
            klen = kb & 0x1F
            pos += 1
            if klen >= 24:
                if klen > 27:
                    raise CborError("indefinite length map key")
                size = 1 << (klen - 24)
                klen = _from_bytes(data[pos : pos + size], "big")
                if klen < _MIN_FOR_INFO[kb & 0x1F] or pos + size > len(data):
                    raise CborError("non-minimal or truncated map key length")
                pos += size
            kend = pos + klen
            if kend > len(data):
                raise CborError("truncated map key")
            key_bytes = data[pos:kend]
            # DAG-CBOR map order: shorter keys first, then bytewise; equal means duplicate.
            if prev is not None and (
                len(key_bytes) < len(prev) or (len(key_bytes) == len(prev) and key_bytes <= prev)
            ):
                raise CborError("map keys must be sorted and unique")
            prev = key_bytes
            key = key_bytes.decode("utf-8")
            if _NUL in key:
                key = key.replace(_NUL, _REPLACEMENT)
                flags[0] = True
            out[key], pos = _item(data, kend, depth - 1, flags)
        return out, pos
    if major == 0:
        return arg, pos
    if major == 4:
        if depth <= 0:
            raise CborError("nesting too deep")
        if arg > len(data) - pos:
            raise CborError("truncated array")
        items: list[Any] = []
        append = items.append
        for _ in range(arg):
            value, pos = _item(data, pos, depth - 1, flags)
            append(value)
        return items, pos
    if major == 7:
        if arg == 21:
            return True, pos
        if arg == 20:
            return False, pos
        if arg == 22:
            return None, pos
        raise CborError(f"simple value {arg} is not allowed")
    if major == 1:
        return -1 - arg, pos
    if major == 2:
        end = pos + arg
        if end > len(data):
            raise CborError("truncated byte string")
        return {"$bytes": _b64encode(data[pos:end]).decode("ascii").rstrip("=")}, end
    # major == 6: only tag 42 (CID), in its minimal one-byte-argument form (d8 2a).
    if arg != _TAG_CID or info != 24:
        raise CborError(f"tag {arg} is not allowed (only 42)")
    if pos + 2 > len(data) or data[pos] != 0x58 or data[pos + 1] != _CID_TAG_BYTES:
        raise CborError("CID tag must hold a 37-byte string")
    start = pos + 2
    end = start + _CID_TAG_BYTES
    if end > len(data):
        raise CborError("truncated CID")
    if data[start] != 0:
        raise CborError("CID must start with the 0x00 multibase prefix")
    cid = data[start + 1 : end]
    if cid[:4] not in SUPPORTED_PREFIXES:
        exc = cid_str_error(cid)
        raise CborError(exc)
    return {"$link": cid_str_from_bytes(cid)}, end


def cid_str_error(cid: bytes) -> str:
    try:
        cid_str_from_bytes(cid)
    except ProtocolError as exc:
        return f"bad CID link: {exc.detail}"
    return "bad CID link"
