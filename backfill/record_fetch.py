"""One record with its proof: ``com.atproto.sync.getRecord``, verified like any CAR.

The answer is a CAR whose root is the repo's current signed commit, holding the commit, the
MST nodes on the path from the commit's data root to the key, and the record block when the
record exists (lexicon com.atproto.sync.getRecord: "data blocks needed to prove the
existence or non-existence of record"). `verify_record_car` (PURE: bytes in, values out)
checks every block's sha256 against its CID (`read_car`), that the commit is the account's
(`did`), and walks the path from the data root to the key (`mst_lookup`), so the record
block must be the one the tree names. A missing record is either an XRPC ``RecordNotFound``
error (the lexicon names it; some PDS software answers it) or a CAR whose whole path
proves the key absent (what the reference PDS answers): both mean "no such record".
`fetch_record` is the I/O half, through the polite `HostClient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backfill.hosts import FetchError, HostClient
from firehose.model import Action, RecordWrite
from firehose.protocol.car import MAX_BLOCK_BYTES, read_car
from firehose.protocol.cbor import decode_record
from firehose.protocol.cid import cid_str_from_bytes
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import MST_ABSENT, MST_FOUND, mst_lookup, read_commit

GET_RECORD_PATH = "/xrpc/com.atproto.sync.getRecord"
# A record (at most MAX_BLOCK_BYTES), the commit and one MST node per layer (a few KiB
# each, a few layers): twice the block cap is far more than any honest proof needs.
RECORD_CAR_MAX_BYTES = 2 * MAX_BLOCK_BYTES
RECORD_CAR_MAX_BLOCKS = 1000  # commit + path (<= 128 layers) + record

FOUND = "found"
ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class RecordProof:
    """A verified getRecord answer: `write` (rev = the commit's rev) or None if absent."""

    did: str
    rev: str
    commit_cid: str
    data_cid: str
    write: RecordWrite | None


@dataclass(frozen=True, slots=True)
class RecordFetch:
    """What `fetch_record` found: FOUND (with its proof) or ABSENT, and the bytes read."""

    outcome: str
    proof: RecordProof | None
    bytes_downloaded: int

    @property
    def rev(self) -> str | None:
        return None if self.proof is None else self.proof.rev


def _bad(detail: str) -> FetchError:
    return FetchError("bad_response", f"getRecord: {detail}", transient=False)


def verify_record_car(data: bytes, did: str, collection: str, rkey: str) -> RecordProof:
    """Verify a getRecord CAR for ``collection/rkey`` of `did` -> its proof; raises
    FetchError (``bad_response``, not transient; ``truncated``, transient, for a CAR cut
    inside a section) for anything that does not prove the record or its absence."""
    try:
        car = read_car(data, max_blocks=RECORD_CAR_MAX_BLOCKS)
    except ProtocolError as exc:
        if exc.detail.startswith(("truncated", "empty CAR")):
            raise FetchError("truncated", f"getRecord CAR: {exc}", transient=True) from None
        raise _bad(f"CAR: {exc}") from None
    try:
        info = read_commit(car)
    except ProtocolError as exc:
        raise _bad(f"commit: {exc}") from None
    if info.did != did:
        # A PDS must not be able to answer with another account's record.
        raise _bad(f"commit is for {info.did[:80]}")
    # A v2 commit reads with the lowest rev (firehose.protocol.mst.V2_COMMIT_REV): any live
    # write of the record supersedes what is written with it.
    key = f"{collection}/{rkey}"
    try:
        found, cid = mst_lookup(info.data_cid, key, car.blocks.get)
    except ProtocolError as exc:
        raise _bad(f"MST: {exc}") from None
    if found == MST_ABSENT:
        return RecordProof(did, info.rev, info.cid, info.data_cid, None)
    if found != MST_FOUND or cid is None:
        raise _bad("the MST path to the key is incomplete")
    block = car.blocks.get(cid)
    if block is None:
        # The CAR's record block (if any) is not the one the tree names: another CID.
        raise _bad(f"record block {cid_str_from_bytes(cid)} (the MST's) is not in the CAR")
    try:
        record, sanitized = decode_record(block)
    except ProtocolError as exc:
        raise _bad(f"record: {exc}") from None
    write = RecordWrite(
        did,
        collection,
        rkey,
        info.rev,
        Action.CREATE,
        cid_str_from_bytes(cid),
        record,
        sanitized,
    )
    return RecordProof(did, info.rev, info.cid, info.data_cid, write)


async def fetch_record(
    http: HostClient,
    pds: str,
    did: str,
    collection: str,
    rkey: str,
    *,
    max_bytes: int = RECORD_CAR_MAX_BYTES,
) -> RecordFetch:
    """GET getRecord and verify it. FetchError for the network's and the PDS's faults (its
    `transient` says whether to retry); RecordNotFound is ABSENT, not an error."""
    url = pds.rstrip("/") + GET_RECORD_PATH
    params: dict[str, Any] = {"did": did, "collection": collection, "rkey": rkey}
    body = bytearray()
    try:
        async with http.stream(url, params, max_bytes=max_bytes) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(
                        "too_large", f"getRecord CAR over {max_bytes} B", transient=False
                    )
    except FetchError as exc:
        if exc.reason == "record_not_found":
            return RecordFetch(ABSENT, None, len(body))
        raise
    proof = verify_record_car(bytes(body), did, collection, rkey)
    return RecordFetch(FOUND if proof.write is not None else ABSENT, proof, len(body))
