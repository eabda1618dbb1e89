"""Hypothesis strategies that mutate real seeds into hostile inputs.

Byte-level mutations (bit flips, interesting bytes, insert/delete/duplicate, truncation,
splicing two seeds) find framing bugs. Format-aware ones reach deeper:

* ``length``: a CBOR head or a CAR section varint replaced by a hostile length (huge,
  zero, off by one, non-minimal, indefinite, over-long varint);
* ``cid``: a CID's version/codec/hash/length byte or digest corrupted, or swapped for
  another CID of the same input (hash-valid but pointing at the wrong block);
* re-hashing (half of the frame and CAR inputs): a block inside the CAR is mutated, as
  bytes or as a decoded value (deleted, retyped, an edge-case number, another block's
  CID), and the CAR rebuilt with the block's new CID, every reference to the old CID (in
  other blocks, the header, the frame body) rewritten in turn, up the DAG. The result
  passes every hash check, so it reaches the commit, MST and record decoders instead of
  stopping at ``block_hash``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import libipld
from hypothesis import strategies as st

from firehose.protocol.car import read_varint
from firehose.protocol.cid import CID_BYTES, PREFIX_DAG_CBOR, PREFIX_RAW

INTERESTING_BYTES = (
    0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1F, 0x20, 0x3F, 0x40, 0x5F, 0x60,
    0x7F, 0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFF,
)  # fmt: skip
# CBOR heads with hostile lengths: 4 GiB and 2^64-1 byte strings/arrays/maps, indefinite
# forms, non-minimal spellings of small numbers, a tag other than 42, a float16.
HOSTILE_HEADS = (
    b"\x5a\xff\xff\xff\xff", b"\x5b" + b"\xff" * 8, b"\x9b" + b"\xff" * 8, b"\xbb" + b"\xff" * 8,
    b"\x7a\x7f\xff\xff\xff", b"\x5f", b"\x9f", b"\xbf", b"\x7f", b"\xff", b"\x18\x01",
    b"\x19\x00\x01", b"\x1b" + b"\x00" * 7 + b"\x01", b"\x58\x00", b"\xd8\x2b", b"\xd9\x00\x2a",
    b"\xf9\x7e\x00", b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xfb\x80" + b"\x00" * 7,
    b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
)  # fmt: skip
HOSTILE_VARINTS = (
    b"\x00", b"\x01", b"\x23", b"\x24", b"\x25", b"\x80\x00", b"\x80\x80\x80\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f", b"\xff" * 10, b"\x80\x80\x80\x80\x01",
)  # fmt: skip
CID_PREFIXES = (PREFIX_DAG_CBOR, PREFIX_RAW)
MAX_REHASH_ROUNDS = 12  # rewrites of one block while re-hashing (bounds a cycle)
BLOCK_MUTATIONS = (
    "flip", "byte", "truncate", "insert", "delete", "duplicate", "splice", "length", "cid",
)  # fmt: skip


def cid_positions(data: bytes | bytearray) -> list[int]:
    """Offsets of every supported CID prefix in `data` (binary CIDs, links or sections)."""
    out = []
    for prefix in CID_PREFIXES:
        start = data.find(prefix)
        while start != -1:
            out.append(start)
            start = data.find(prefix, start + 1)
    return sorted(out)


def car_sections(data: bytes | bytearray) -> list[tuple[int, int, int]]:
    """``(varint start, payload start, payload end)`` of the header and each section,
    as far as the CAR parses (lenient: stops at the first impossible length)."""
    out = []
    pos = 0
    while pos < len(data):
        try:
            length, start = read_varint(data, pos)
        except Exception:
            break
        if start + length > len(data):
            break
        out.append((pos, start, start + length))
        pos = start + length
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def rehash_car(car: bytes, index: int, block: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """`car` with section `index` (0 = first block) replaced by `block` under its new CID,
    and every reference to a changed CID rewritten, up the DAG until nothing changes.
    Returns the new CAR and the map old CID -> new CID (to rewrite links outside the CAR;
    a CID that changed twice maps to its intermediate CID, which maps on: see `_final`).
    """
    sections = car_sections(car)
    if len(sections) < 2:
        return car, {}
    header = car[sections[0][1] : sections[0][2]]
    blocks: list[list[bytes]] = []
    for _, start, end in sections[1:]:
        if end - start < CID_BYTES:
            return car, {}
        blocks.append([car[start : start + CID_BYTES], car[start + CID_BYTES : end]])
    # Which blocks hold which CID, so a change visits only the blocks that link to it.
    holders: dict[bytes, list[int]] = {}
    for i, (_, body) in enumerate(blocks):
        for at in cid_positions(body):
            holders.setdefault(body[at : at + CID_BYTES], []).append(i)
    index %= len(blocks)
    for at in cid_positions(block):
        holders.setdefault(block[at : at + CID_BYTES], []).append(index)
    mapping: dict[bytes, bytes] = {}
    work = [_set_block(blocks, index, block)]
    updates = [0] * len(blocks)
    while work:
        old, new = work.pop()
        if old == new:
            continue
        mapping[old] = new
        for i in holders.get(old, ()):
            # A mutation that made a block link to its own ancestor makes a cycle that
            # never settles: each block is rewritten a bounded number of times, after
            # which its links stay stale (just another hostile input).
            if updates[i] >= MAX_REHASH_ROUNDS or old not in blocks[i][1]:
                continue
            updates[i] += 1
            holders.setdefault(new, []).append(i)
            work.append(_set_block(blocks, i, blocks[i][1].replace(old, new)))
    for old in mapping:
        header = header.replace(old, _final(mapping, old))
    out = bytearray(_varint(len(header)) + header)
    for cid, body in blocks:
        out += _varint(len(cid) + len(body)) + cid + body
    return bytes(out), mapping


def _set_block(blocks: list[list[bytes]], i: int, body: bytes) -> tuple[bytes, bytes]:
    """Store `body` as block `i` under its new CID; return (old CID, new CID)."""
    old = blocks[i][0]
    new = old[:4] + hashlib.sha256(body).digest()
    blocks[i] = [new, body]
    return old, new


def _final(mapping: dict[bytes, bytes], cid: bytes) -> bytes:
    """Where a CID ended up after a chain of changes (bounded: a cycle stops early)."""
    for _ in range(len(mapping)):
        if cid not in mapping:
            break
        cid = mapping[cid]
    return cid


def _byte_mutation(draw: st.DrawFn, data: bytearray, seeds: tuple[bytes, ...], kind: str) -> None:
    pos = draw(st.integers(0, max(len(data) - 1, 0)))
    if kind == "flip" and data:
        data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte" and data:
        data[pos] = draw(st.sampled_from(INTERESTING_BYTES))
    elif kind == "truncate":
        del data[pos:]
    elif kind == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del data[pos : pos + draw(st.integers(1, 64))]
    elif kind == "duplicate":
        chunk = data[pos : pos + draw(st.integers(1, 128))]
        data[pos:pos] = chunk * draw(st.integers(1, 4))
    elif kind == "splice":
        other = draw(st.sampled_from(seeds))
        cut = draw(st.integers(0, len(other)))
        data[pos:] = other[cut:]
    elif kind == "length":
        heads = HOSTILE_HEADS + HOSTILE_VARINTS
        sections = car_sections(data)
        if sections and draw(st.booleans()):
            varint_at, start, _ = draw(st.sampled_from(sections))
            data[varint_at:start] = draw(st.sampled_from(HOSTILE_VARINTS))
        else:
            head = draw(st.sampled_from(heads))
            data[pos : pos + draw(st.integers(0, len(head)))] = head
    elif kind == "cid":
        _cid_mutation(draw, data)
    elif kind == "random":
        data[:] = draw(st.binary(max_size=512))


def _cid_mutation(draw: st.DrawFn, data: bytearray) -> None:
    positions = cid_positions(data)
    if not positions:
        return
    at = draw(st.sampled_from(positions))
    how = draw(st.sampled_from(["version", "codec", "hash", "size", "digest", "swap", "v0"]))
    if how == "version":
        data[at] = draw(st.sampled_from([0x00, 0x02, 0x12, 0x81]))
    elif how == "codec":
        data[at + 1] = draw(st.sampled_from([0x70, 0x55, 0x71, 0x72, 0x00, 0x80]))
    elif how == "hash":
        data[at + 2] = draw(st.sampled_from([0x13, 0x1E, 0x00, 0x80]))
    elif how == "size":
        data[at + 3] = draw(st.sampled_from([0x00, 0x1F, 0x21, 0x40, 0x80]))
    elif how == "digest" and at + CID_BYTES <= len(data):
        data[at + draw(st.integers(4, CID_BYTES - 1))] ^= 0xFF
    elif how == "swap":
        other = draw(st.sampled_from(positions))
        cid = bytes(data[other : other + CID_BYTES])
        if len(cid) == CID_BYTES:
            data[at : at + CID_BYTES] = cid
    else:
        data[at : at + 2] = b"\x12\x20"


def _rehash(draw: st.DrawFn, data: bytearray, seeds: tuple[bytes, ...], layout: str) -> None:
    """Mutate one block of the CAR (or of the frame's `blocks` CAR) and re-hash the DAG."""
    if layout == "car":
        data[:] = _mutated_block_car(draw, bytes(data), seeds)[0]
        return
    try:  # a frame: header + body; the body's `blocks` is a CAR
        parts = libipld.decode_dag_cbor_multi(bytes(data))
    except Exception:  # already broken by an earlier mutation: nothing to re-hash
        return
    if len(parts) != 2 or type(parts[1]) is not dict or type(parts[1].get("blocks")) is not bytes:
        return
    header, body = parts
    car, mapping = _mutated_block_car(draw, body["blocks"], seeds)
    body = _relink(body, mapping)
    body["blocks"] = car
    try:
        data[:] = libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)
    except Exception:  # e.g. a float libipld will not encode: keep the input as it was
        return


def _mutated_block_car(
    draw: st.DrawFn, car: bytes, seeds: tuple[bytes, ...]
) -> tuple[bytes, dict[bytes, bytes]]:
    sections = car_sections(car)[1:]
    if not sections:
        return car, {}
    index = draw(st.integers(0, len(sections) - 1))
    _, start, end = sections[index]
    block = bytearray(car[start + CID_BYTES : end])
    if draw(st.booleans()):
        return rehash_car(car, index, _value_mutation(draw, bytes(block), car))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(BLOCK_MUTATIONS))
        _byte_mutation(draw, block, seeds, kind)
    return rehash_car(car, index, bytes(block))


def _value_mutation(draw: st.DrawFn, block: bytes, car: bytes) -> bytes:
    """The block decoded, one value in it deleted, replaced (by a value of another type,
    an edge-case number, or a CID of the same CAR: a wrong but existing block), or a list
    reordered or repeated, then re-encoded: valid DAG-CBOR with the wrong content, which
    reaches the checks of commits (did, rev, data), MST nodes (p, k, v, t, order) and ops."""
    try:
        root = libipld.decode_dag_cbor(block)
    except Exception:  # not DAG-CBOR (a raw block): nothing to change at the value level
        return block
    slots: list[tuple[Any, Any]] = []
    stack = [root]
    while stack and len(slots) < 500:
        node = stack.pop()
        keys = list(node) if type(node) is dict else range(len(node)) if type(node) is list else []
        for key in keys:
            slots.append((node, key))
            stack.append(node[key])
    if not slots:
        return block
    container, key = draw(st.sampled_from(slots))
    cids = [bytes(car[at : at + CID_BYTES]) for at in cid_positions(car)[:50]]
    how = draw(st.sampled_from(["delete", "replace", "cid", "reverse", "repeat"]))
    if how == "delete" and type(container) is dict:
        del container[key]
    elif how == "cid" and cids:
        container[key] = draw(st.sampled_from(cids))
    elif how in ("reverse", "repeat") and type(container[key]) is list:
        items = container[key]
        container[key] = items[::-1] if how == "reverse" else items + items[:1]
    else:
        container[key] = draw(ODD_VALUES)
    try:
        return bytes(libipld.encode_dag_cbor(root))
    except Exception:  # a value libipld cannot encode: keep the block
        return block


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5]),
    st.text(max_size=12),
    st.sampled_from(["", "a" * 2000, "did:plc:x", "3jzfcijpj2z2a", "app.bsky.feed.post/x", "\x00"]),
    st.binary(max_size=40),
    st.just([]),
    st.just({}),
)


def _relink(value: Any, mapping: dict[bytes, bytes]) -> Any:
    """`value` with every link (libipld: CID bytes) renamed through `mapping`."""
    if type(value) is bytes:
        return _final(mapping, value) if value in mapping else value
    if type(value) is dict:
        return {k: _relink(v, mapping) for k, v in value.items()}
    if type(value) is list:
        return [_relink(v, mapping) for v in value]
    return value


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...], layout: str = "cbor") -> bytes:
    """A seed, mutated.

    `layout` says what the seeds are (``frame``, ``car`` or ``cbor``). Frames and CARs get
    either re-hashed block mutations only (deep mode: the input passes the framing and hash
    checks and reaches the commit, MST and record decoders behind them, where plain byte
    mutations of a frame stop at its CBOR or a block hash ~95% of the time) or 0-4 byte
    mutations (0 keeps the seed itself in the run: the baseline); other seeds the latter.
    """
    data = bytearray(draw(st.sampled_from(seeds)))
    if layout in ("frame", "car") and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            _rehash(draw, data, seeds, layout)
        return bytes(data)
    kinds = (*BLOCK_MUTATIONS, "random")
    for _ in range(draw(st.integers(0, 4))):
        _byte_mutation(draw, data, seeds, draw(st.sampled_from(kinds)))
    return bytes(data)
