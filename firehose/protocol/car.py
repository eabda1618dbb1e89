"""CAR v1 reader (https://ipld.io/specs/transport/car/carv1/), with atproto's rules.

Layout: ``varint(len) header`` then sections ``varint(len) cid block``. The header is
DAG-CBOR ``{version: 1, roots: [cid]}``; atproto repo exports and firehose diffs always
have exactly one root, the commit (https://atproto.com/specs/repository#car-file-serialization),
so zero or several roots are rejected. Every block is sha2-256 checked against its CID
before anyone reads it: libipld's CAR reader does not check, and an unchecked block lets a
relay or PDS substitute records. CIDs are the 36-byte atproto form (see `cid.py`).
Duplicate sections are allowed (old repo exports repeat blocks); the last copy wins.

* `read_car` checks every block (and every copy) as it reads: for CARs whose blocks are all
  used (a getRecord proof, whose MST nodes are walked).
* `read_car_lazily` checks a block when it is read (`LazyCar.block`). A firehose commit's
  CAR holds the commit, its records and the MST nodes of its proof (about 2.6 of 4.5 blocks
  per devnet commit, more on the network); the live path reads only the first two.
  Hashing every block cost the worker ~13 µs per event (bench/live.py with all hashing
  and with none: 128.7-129.8 against 116.0-116.6 µs of worker CPU per event, load average
  0.56-0.57), of which this reader keeps the part for blocks nobody reads.

Both walk the sections in one loop (local names, single-byte varint fast path: the hot
path). `CarStreamReader` does the same over chunks, so a backfill can verify a multi-GB repo
download without holding it in memory.
"""

from __future__ import annotations

import hashlib

from firehose.protocol.cbor import decode_block
from firehose.protocol.cid import (
    CID_BYTES,
    SUPPORTED_PREFIXES,
    cid_str_from_bytes,
    explain_bad_cid,
    is_supported_cid,
)
from firehose.protocol.errors import CarError

# Records are at most 1 MiB of DAG-CBOR in practice (the reference PDS caps record size well
# below that); MST nodes and commits are far smaller. A bigger block is hostile.
MAX_BLOCK_BYTES = 1024 * 1024
# A whole-repo export may hold millions of blocks; the caller (backfill) passes its own cap.
MAX_BLOCKS = 10_000_000
# The header is `{roots: [cid], version: 1}`: ~60 bytes. 1 KiB leaves room for odd spellings.
MAX_HEADER_BYTES = 1024
_MAX_VARINT_BYTES = 9  # unsigned-varint spec: at most 9 bytes (63 bits)

_sha256 = hashlib.sha256


class Car:
    """A verified CAR: its single root and its blocks keyed by binary CID (36 bytes).

    A plain slotted class rather than a frozen dataclass (cheaper to build); the root's
    string form is computed on first use. Treat it as immutable.
    """

    __slots__ = ("_root", "blocks", "root_cid")

    def __init__(self, root: str | None, root_cid: bytes, blocks: dict[bytes, bytes]) -> None:
        self._root = root
        self.root_cid = root_cid
        self.blocks = blocks

    @property
    def root(self) -> str:
        if self._root is None:
            self._root = cid_str_from_bytes(self.root_cid)
        return self._root

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Car):
            return NotImplemented
        return self.root_cid == other.root_cid and self.blocks == other.blocks

    __hash__ = None  # type: ignore[assignment]  # mutable container semantics, like before

    def __repr__(self) -> str:
        return f"Car(root={self.root!r}, blocks={len(self.blocks)})"


# The canonical DAG-CBOR header with one root, `{"roots": [cid], "version": 1}`, as every
# atproto CAR spells it: 13 bytes, the 36-byte CID, 9 bytes. `read_car` takes the root
# straight out of such a header; anything else goes through `parse_header`.
_HEADER_HEAD = bytes.fromhex("a265726f6f747381d82a582500")
_HEADER_TAIL = bytes.fromhex("6776657273696f6e01")
_HEADER_BYTES = len(_HEADER_HEAD) + CID_BYTES + len(_HEADER_TAIL)
_HEADER_CID_AT = 1 + len(_HEADER_HEAD)  # after the one-byte length varint
_HEADER_PREFIX_END = _HEADER_CID_AT + 4
_HEADER_TAIL_AT = _HEADER_CID_AT + CID_BYTES
# Prefixes are checked as a slice in a frozenset: bytes.startswith(tuple, pos) parses its
# arguments with PyArg_ParseTuple and cost ~2x as much per call (0.22 against 0.13 µs).


def read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """Unsigned LEB128 varint at `pos` -> (value, next pos). Raises CarError if truncated."""
    value = 0
    shift = 0
    end = min(len(data), pos + _MAX_VARINT_BYTES)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    if end == len(data):
        raise CarError("truncated varint")
    raise CarError("varint longer than 9 bytes")


def parse_header(header: bytes) -> bytes:
    """DAG-CBOR CAR header -> the binary CID of its single root."""
    obj = decode_block(header)
    if type(obj) is not dict:
        raise CarError("header is not a map")
    if obj.get("version") != 1:
        raise CarError(f"CAR version {obj.get('version')!r}", "unsupported")
    roots = obj.get("roots")
    if type(roots) is not list or len(roots) != 1:
        count = len(roots) if type(roots) is list else "no"
        raise CarError(f"CAR must have exactly one root, has {count}")
    root = roots[0]
    if not is_supported_cid(root):
        raise explain_bad_cid(root) if type(root) is bytes else CarError("root is not a CID")
    return root


def read_car(
    data: bytes,
    *,
    max_block_bytes: int = MAX_BLOCK_BYTES,
    max_blocks: int = MAX_BLOCKS,
) -> Car:
    """Parse a whole CAR held in memory, every block hash-checked. Raises ProtocolError."""
    root, blocks = _read_sections(data, max_block_bytes, max_blocks, True)
    return Car(None, root, blocks)


class LazyCar:
    """A CAR read whole, its blocks hash-checked when read (`block`), not before."""

    __slots__ = ("_blocks", "root_cid")

    def __init__(self, root_cid: bytes, blocks: dict[bytes, bytes]) -> None:
        self.root_cid = root_cid
        self._blocks = blocks

    @property
    def root(self) -> str:
        return cid_str_from_bytes(self.root_cid)

    def block(self, cid: bytes) -> bytes | None:
        """The block of binary `cid` (its last copy), hash-checked; None when the CAR has
        none. Raises CarError (reason ``block_hash``) when it does not match its CID."""
        block = self._blocks.get(cid)
        # Every key is a 36-byte CID (`_read_sections`): the hash check of `verify_block`,
        # inline, as this runs for each block the live path reads.
        if block is not None and _sha256(block).digest() != cid[4:]:
            raise _hash_mismatch(cid)
        return block


def read_car_lazily(
    data: bytes,
    *,
    max_block_bytes: int = MAX_BLOCK_BYTES,
    max_blocks: int = MAX_BLOCKS,
) -> LazyCar:
    """Parse a whole CAR held in memory: its header, section lengths and CID prefixes are
    checked now, each block's hash when it is read (`LazyCar.block`). Raises ProtocolError."""
    root, blocks = _read_sections(data, max_block_bytes, max_blocks, False)
    return LazyCar(root, blocks)


def _read_sections(
    data: bytes, max_block_bytes: int, max_blocks: int, verify: bool
) -> tuple[bytes, dict[bytes, bytes]]:
    """The root and the blocks of a CAR; with `verify`, every block hash-checked."""
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if not n:
        raise CarError("empty CAR")
    if (
        data[0] == _HEADER_BYTES
        and data[1:_HEADER_CID_AT] == _HEADER_HEAD
        and data[_HEADER_TAIL_AT : 1 + _HEADER_BYTES] == _HEADER_TAIL
        and data[_HEADER_CID_AT:_HEADER_PREFIX_END] in SUPPORTED_PREFIXES
    ):
        # Fast path: byte-for-byte the canonical one-root header (what parse_header accepts
        # for this spelling, without decoding it).
        root = data[_HEADER_CID_AT : _HEADER_CID_AT + CID_BYTES]
        pos = 1 + _HEADER_BYTES
    else:
        hlen, pos = read_varint(data, 0)
        if hlen > MAX_HEADER_BYTES:
            raise CarError(f"header of {hlen} bytes", "too_large")
        if pos + hlen > n or hlen == 0:
            raise CarError("truncated header")
        root = parse_header(data[pos : pos + hlen])
        pos += hlen
    blocks: dict[bytes, bytes] = {}
    max_section = CID_BYTES + max_block_bytes
    count = 0
    prefixes = SUPPORTED_PREFIXES
    sha256 = _sha256
    while pos < n:
        # Section length varint: one byte up to 127, two bytes up to 16383 (most blocks).
        length = data[pos]
        if length < 0x80:
            pos += 1
        elif pos + 1 < n and data[pos + 1] < 0x80:
            length = (length & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            length, pos = read_varint(data, pos)
        end = pos + length
        if length > max_section or end > n or length < CID_BYTES:
            _bad_section(length, max_section, end > n)
        cid_end = pos + CID_BYTES
        cid = data[pos:cid_end]
        if cid[:4] not in prefixes:
            raise explain_bad_cid(data[pos:end])
        block = data[cid_end:end]
        if verify and sha256(block).digest() != cid[4:]:
            raise _hash_mismatch(cid)
        blocks[cid] = block
        count += 1
        if count > max_blocks:
            raise CarError(f"more than {max_blocks} blocks", "too_large")
        pos = end
    return root, blocks


# The per-block loops of `_read_sections` and `CarStreamReader.feed` stay two inlined copies:
# reading a frame's CAR through the streaming reader cost 1.6-2.1 µs more per frame (12.5-12.6
# against 10.4-11.0 µs on recorded frames), and a function call is ~0.1 µs per block. Their
# error paths are shared.


def _hash_mismatch(cid: bytes) -> CarError:
    return CarError(f"block {cid_str_from_bytes(cid)} does not match its CID", "block_hash")


def _bad_section(length: int, max_section: int, truncated: bool) -> None:
    """Raise the error of a section whose length is out of bounds (slow path)."""
    if length > max_section:
        raise CarError(f"block of {length - CID_BYTES} bytes", "too_large")
    if truncated:
        raise CarError("truncated section")
    raise CarError(f"section of {length} bytes is too short for a CID")


class CarStreamReader:
    """Incremental CAR reader: `feed` chunks, get verified ``(cid, block)`` pairs back.

    Memory is bounded by one section (``max_block_bytes``) plus the unread tail of the
    last chunk. Call `close` at the end of the download: it raises if the CAR stopped in
    the middle of a section (a truncated download must not look like a small repo).
    """

    def __init__(
        self, *, max_block_bytes: int = MAX_BLOCK_BYTES, max_blocks: int = MAX_BLOCKS
    ) -> None:
        self._buf = bytearray()
        self._max_section = CID_BYTES + max_block_bytes
        self._max_blocks = max_blocks
        self.blocks_read = 0
        self.bytes_read = 0
        self.root_cid: bytes | None = None

    @property
    def root(self) -> str | None:
        """The root CID string, once the header has been read."""
        return None if self.root_cid is None else cid_str_from_bytes(self.root_cid)

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Add bytes; return the blocks completed by them, each hash-checked."""
        buf = self._buf
        buf += chunk
        self.bytes_read += len(chunk)
        # One immutable copy per chunk: slices of it are single copies (a bytearray slice
        # wrapped in bytes() is two).
        data = bytes(buf)
        n = len(data)
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        max_section = self._max_section
        prefixes = SUPPORTED_PREFIXES
        sha256 = _sha256
        count = self.blocks_read  # a local in the loop, stored back in `finally`
        max_blocks = self._max_blocks
        try:
            while pos < n:
                start = pos
                # Section length varint: one byte up to 127, two bytes up to 16383 (most
                # blocks), else the general reader.
                length = data[pos]
                if length < 0x80:
                    pos += 1
                elif pos + 1 < n and data[pos + 1] < 0x80:
                    length = (length & 0x7F) | (data[pos + 1] << 7)
                    pos += 2
                else:
                    try:
                        length, pos = read_varint(data, pos)
                    except CarError:
                        if n - start >= _MAX_VARINT_BYTES:
                            raise
                        pos = start
                        break  # the varint continues in the next chunk
                if self.root_cid is None:
                    if length > MAX_HEADER_BYTES:
                        raise CarError(f"header of {length} bytes", "too_large")
                    if length == 0:
                        raise CarError("empty header")
                    if pos + length > n:
                        pos = start
                        break
                    self.root_cid = parse_header(data[pos : pos + length])
                    pos += length
                    continue
                if length > max_section or length < CID_BYTES:
                    _bad_section(length, max_section, False)
                end = pos + length
                if end > n:
                    pos = start
                    break
                cid_end = pos + CID_BYTES
                cid = data[pos:cid_end]
                if cid[:4] not in prefixes:
                    raise explain_bad_cid(data[pos:end])
                block = data[cid_end:end]
                if sha256(block).digest() != cid[4:]:
                    raise _hash_mismatch(cid)
                count += 1
                if count > max_blocks:
                    raise CarError(f"more than {max_blocks} blocks", "too_large")
                out.append((cid, block))
                pos = end
        finally:
            self.blocks_read = count
            del buf[:pos]
        return out

    def close(self) -> None:
        """Declare the end of input; raise if a header or section was left incomplete."""
        if self.root_cid is None:
            raise CarError("truncated header" if self.bytes_read else "empty CAR")
        if self._buf:
            raise CarError(f"truncated section ({len(self._buf)} bytes left over)")
