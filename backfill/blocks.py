"""Where a download's verified blocks are kept until its MST is walked: on disk or in memory.

`BlockSpool` appends each block to an anonymous temp file (O_TMPFILE where available:
nothing is left behind even after kill -9) and keeps in memory only an index, 16 bytes per
block whatever the block size, reading blocks back with ``os.pread``: a repo export of
hundreds of MB never sits in memory. `MemoryBlocks` keeps a small repo's blocks in a dict,
with the same interface, within the process's `MemoryBudget` (a share of
BACKFILL_MAX_MEMORY_MB over all its repos in flight). backfill.download decides which one a
download uses and when it spills from memory to disk.

Both hold only blocks the CAR reader has hash-checked; for a CID repeated in the CAR the
last copy wins in both, as in `read_car`.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from firehose.protocol.cid import CID_BYTES

SPOOL_WRITE_BUFFER_BYTES = 1024 * 1024
# The MemoryBudget of a process: this fraction of its BACKFILL_MAX_MEMORY_MB share, counted
# in CAR bytes. A repo held in memory takes about twice its CAR (a bytes object and a dict
# slot per block, and its MST entries), so in-memory repos use at most about a quarter.
MEMORY_BUDGET_FRACTION = 8
_LENGTH_BITS = 21  # a section is at most CID_BYTES + MAX_BLOCK_BYTES (1 MiB) < 2**21
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_KEY_SLICE = slice(4, 12)  # 8 bytes of the sha256 digest: the index key


class BlockSpool:
    """Verified blocks on disk (``cid || block`` per entry) with a compact in-memory index.

    The index is two ``array('Q')``: the key (8 bytes of the block's sha256 digest) and the
    packed ``offset << 21 | length`` of each section, 16 bytes per block (a dict of the same
    would cost ~140). `add` appends; `seal` sorts them once, after the download (stable, so
    among repeated sections the last copy wins, as in `read_car`); `get` bisects. The stored
    CID is compared on every read, so two CIDs sharing a key (the same digest under another
    codec, or a hostile collision) are told apart.
    """

    def __init__(self, spool_dir: Path) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        # Owned by the spool for its lifetime; closed (and so deleted) by `close`.
        self._file: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115
            dir=spool_dir, prefix="repo-", suffix=".blocks"
        )
        self._fd = self._file.fileno()
        self._keys = array("Q")
        self._packed = array("Q")
        self._sealed = False
        self._buffer = bytearray()
        self._size = 0  # bytes written or buffered
        self.blocks = 0

    def add(self, cid: bytes, block: bytes) -> None:
        if self._sealed:
            raise ValueError("spool is sealed")
        self._keys.append(int.from_bytes(cid[_KEY_SLICE], "little"))
        self._packed.append((self._size << _LENGTH_BITS) | (CID_BYTES + len(block)))
        self._buffer += cid
        self._buffer += block
        self._size += CID_BYTES + len(block)
        self.blocks += 1
        if len(self._buffer) >= SPOOL_WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._file.write(self._buffer)
            self._file.flush()
            self._buffer.clear()

    def seal(self) -> None:
        """Flush and sort the index (CPU: run it off the event loop for big repos)."""
        self.flush()
        if self._sealed:
            return
        keys, packed = self._keys, self._packed
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = array("Q", [keys[i] for i in order])
        self._packed = array("Q", [packed[i] for i in order])
        self._sealed = True

    def _read_section(self, packed: int) -> tuple[bytes, bytes]:
        offset, length = packed >> _LENGTH_BITS, packed & _LENGTH_MASK
        data = os.pread(self._fd, length, offset)
        return data[:CID_BYTES], data[CID_BYTES:]

    def get(self, cid: bytes) -> bytes | None:
        """The block of binary CID `cid`, read from disk, or None if absent."""
        if not self._sealed:
            raise ValueError("spool is not sealed")
        keys = self._keys
        key = int.from_bytes(cid[_KEY_SLICE], "little")
        i = bisect_left(keys, key)
        found = None
        while i < len(keys) and keys[i] == key:
            stored, block = self._read_section(self._packed[i])
            if stored == cid:
                found = block  # keep scanning: the last copy wins
            i += 1
        return found

    def has_key_for(self, cid: bytes) -> bool:
        """Cheap presence test (index only, no disk read): for the completeness walk."""
        key = int.from_bytes(cid[_KEY_SLICE], "little")
        i = bisect_left(self._keys, key)
        return i < len(self._keys) and self._keys[i] == key

    def close(self) -> None:
        self._keys = array("Q")
        self._packed = array("Q")
        self._buffer.clear()
        self._file.close()


class MemoryBudget:
    """The CAR bytes one process may hold in memory at once, over all its repos in flight
    (`MemoryBlocks.reserve`): a download that finds no room spills to the disk spool."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def take(self, size: int) -> bool:
        if self.used_bytes + size > self.limit_bytes:
            return False
        self.used_bytes += size
        return True

    def give(self, size: int) -> None:
        self.used_bytes -= size


class MemoryBlocks:
    """The blocks of a small repo in memory, with `BlockSpool`'s interface. Keys are whole
    binary CIDs, so `get` is exact; a repeated section replaces the earlier copy (the last
    copy wins, as in the spool). What it holds is taken from `budget` (`reserve`) and given
    back when it closes."""

    def __init__(self, budget: MemoryBudget | None = None) -> None:
        self._blocks: dict[bytes, bytes] = {}
        self.blocks = 0
        self.size = 0
        self._budget = budget
        self._held = 0  # bytes of `budget` taken

    def reserve(self, max_bytes: int) -> bool:
        """Take what the blocks added since the last call hold from the budget; False (and
        nothing taken) when the repo would pass `max_bytes` or the budget has no room: the
        caller then spills it to the disk spool, which closes this."""
        if self.size > max_bytes:
            return False
        if self._budget is not None:
            if not self._budget.take(self.size - self._held):
                return False
            self._held = self.size
        return True

    def add(self, cid: bytes, block: bytes) -> None:
        self._blocks[cid] = block
        self.blocks += 1
        self.size += CID_BYTES + len(block)

    def seal(self) -> None:
        pass

    def get(self, cid: bytes) -> bytes | None:
        return self._blocks.get(cid)

    def has_key_for(self, cid: bytes) -> bool:
        return cid in self._blocks

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._blocks.items())

    def close(self) -> None:
        self._blocks = {}
        if self._budget is not None:
            self._budget.give(self._held)
            self._held = 0


Blocks = BlockSpool | MemoryBlocks


def spill(memory: MemoryBlocks, spool_dir: Path) -> BlockSpool:
    """A repo grew past what memory may hold of it: move its blocks to the disk spool."""
    spool = BlockSpool(spool_dir)
    try:
        for cid, block in memory.items():
            spool.add(cid, block)
    except BaseException:
        spool.close()
        raise
    finally:
        memory.close()
    return spool
