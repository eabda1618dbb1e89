"""Real repository CAR files served verbatim by a devnet PDS (`--extra-car PATH`).

The file is read once with libipld (an independent decoder; the devnet never imports
`firehose.protocol`): the root is the signed commit (repository spec,
https://atproto.com/specs/repository#commit-objects) whose `did` and `rev` identify the
repo, and whose `data` is the MST root. Walking the MST (node ``{l, e: [{p, k, v, t}]}``)
gives every record path and CID for the truth file; record values, where their blocks are
present, give `createdAt` for the record-time rule. getRepo returns the file's bytes
unchanged, so the backfill sees exactly what a real PDS produced.

Such a file carries no per-block history, so the devnet treats every block as first written
by the file's commit: `getRepo?since=` answers the whole file when `since` is older than its
rev and an empty CAR otherwise. `getRecord` serves the commit, the MST path and the record
from the file's blocks (`proof`).

The account's signing key is not in the CAR, so the DID document the devnet's PLC directory
serves for it has no verification method: signatures of these repos cannot be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libipld

from firehose.devnet import dagcbor
from firehose.devnet.clock import record_time_us

HANDLE_SUFFIX = ".extra.devnet.test"
V2_REV = "2222222222222"  # the lowest TID: the rev of a v2 commit, which has none


@dataclass
class CarRepo:
    """One served CAR: identity, head, and the records the truth file lists."""

    path: str
    did: str
    rev: str
    commit_cid: bytes
    data: bytes = field(repr=False)
    records: dict[str, bytes] = field(default_factory=dict, repr=False)  # path -> cid
    times: dict[str, int | None] = field(default_factory=dict, repr=False)
    handle: str = ""
    raw: dict[bytes, bytes] = field(default_factory=dict, repr=False)  # cid -> block bytes
    nodes: dict[bytes, Any] = field(default_factory=dict, repr=False)  # cid -> decoded
    header_bytes: int = 0  # the CAR header section (varint + header)

    @property
    def collections(self) -> set[str]:
        return {path.split("/", 1)[0] for path in self.records}

    def proof(self, path: str) -> list[tuple[bytes, bytes]]:
        """The MST nodes from the root down to `path`'s entry (or where it would be), then
        the record's block if present: the blocks of com.atproto.sync.getRecord."""
        key = path.encode()
        commit = self.nodes[self.commit_cid]
        cid: bytes | None = _cid_bytes(commit["data"])
        out: list[tuple[bytes, bytes]] = []
        while cid is not None:
            out.append((cid, self.raw[cid]))
            node = self.nodes[cid]
            previous, pointer = b"", node.get("l")
            for entry in node.get("e", []):
                entry_key = previous[: entry["p"]] + entry["k"]
                if entry_key == key:
                    record = self.records[path]
                    if record in self.raw:
                        out.append((record, self.raw[record]))
                    return out
                if entry_key > key:
                    break
                previous, pointer = entry_key, entry.get("t")
            cid = None if pointer is None else _cid_bytes(pointer)
        return out

    def section_sizes(self) -> list[int]:
        """Bytes of each block section (varint + cid + block), in file order."""
        return [len(dagcbor.car_section(cid, block)) for cid, block in self.raw.items()]

    def truth_records(self) -> dict[str, str]:
        return {f"at://{self.did}/{p}": dagcbor.cid_str(c) for p, c in self.records.items()}

    def truth_times(self) -> dict[str, int | None]:
        return {f"at://{self.did}/{p}": t for p, t in self.times.items()}


def _cid_bytes(link: Any) -> bytes:
    """libipld gives CID links as bytes (binary CID); tolerate the multibase-prefixed form."""
    if isinstance(link, bytes):
        return link[1:] if link[:1] == b"\x00" else link
    if isinstance(link, str):
        return dagcbor.cid_from_str(link)
    raise ValueError(f"not a CID link: {link!r}")


def _walk(blocks: dict[bytes, Any], cid: bytes, out: dict[str, bytes]) -> None:
    node = blocks.get(cid)
    if node is None:
        raise ValueError(f"MST node {dagcbor.cid_str(cid)} missing from the CAR")
    if node.get("l") is not None:
        _walk(blocks, _cid_bytes(node["l"]), out)
    previous = b""
    for entry in node.get("e", []):
        key = previous[: entry["p"]] + entry["k"]
        out[key.decode()] = _cid_bytes(entry["v"])
        previous = key
        if entry.get("t") is not None:
            _walk(blocks, _cid_bytes(entry["t"]), out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _raw_sections(data: bytes) -> tuple[int, dict[bytes, bytes]]:
    """(header section bytes, cid -> block bytes) of a CAR v1 whose CIDs are CIDv1 sha2-256
    (36 bytes, what atproto repos use; libipld has already rejected anything else)."""
    length, pos = _varint(data, 0)
    header = pos + length
    pos, raw = header, {}
    while pos < len(data):
        length, pos = _varint(data, pos)
        raw[data[pos : pos + 36]] = data[pos + 36 : pos + length]
        pos += length
    return header, raw


def load_car(path: str | Path, index: int) -> CarRepo:
    """Parse a repo CAR file; `index` only names the synthetic handle."""
    data = Path(path).read_bytes()
    header, raw_blocks = libipld.decode_car(data)
    blocks = {_cid_bytes(cid): value for cid, value in raw_blocks.items()}
    root = _cid_bytes(header["roots"][0])
    commit = blocks.get(root)
    if not isinstance(commit, dict) or not isinstance(commit.get("did"), str):
        raise ValueError(f"{path}: root block is not a repo commit")
    # A repo v2 commit has no rev: the devnet lists and compares it as the lowest TID, the
    # rev the indexer reads it with (firehose.protocol.mst.V2_COMMIT_REV, not imported: the
    # devnet keeps its own decoding), so any v3 rev and any `since` are later.
    rev = commit.get("rev")
    repo = CarRepo(str(path), commit["did"], V2_REV if rev is None else str(rev), root, data)
    repo.nodes = blocks
    repo.header_bytes, repo.raw = _raw_sections(data)
    _walk(blocks, _cid_bytes(commit["data"]), repo.records)
    for record_path, cid in repo.records.items():
        collection, rkey = record_path.split("/", 1)
        value = blocks.get(cid)
        record = value if isinstance(value, dict) else None
        repo.times[record_path] = record_time_us(rkey, record, collection)
    repo.handle = f"extra-{index}{HANDLE_SUFFIX}"
    return repo
