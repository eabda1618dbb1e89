"""Test helper: write a synthetic repo CAR of N records to a file, with the devnet encoder.

Run as a subprocess (``python tests/backfill_bigrepo.py OUT N DID``) so that the memory used
to build it is not in the RSS of the test that downloads it. Records are ~1 KiB posts with
TID rkeys one second apart; the commit signature is zero bytes (fetch_repo does not verify
signatures). Prints ``{"bytes": ..., "records": ..., "rev": ..., "data": ...}``.
"""

from __future__ import annotations

import json
import sys

from firehose.devnet import dagcbor
from firehose.devnet.mst import build_mst
from firehose.protocol.syntax import make_tid

COLLECTION = "app.bsky.feed.post"
START_MICROS = 1_700_000_000 * 1_000_000


def build(out: str, records: int, did: str) -> dict[str, object]:
    padding = "x" * 900
    items: list[tuple[str, bytes]] = []
    size = 0
    with open(out, "wb") as car:
        record_sections = []
        for i in range(records):
            micros = START_MICROS + i * 1_000_000
            rkey = make_tid(micros)
            value = {
                "$type": COLLECTION,
                "text": f"post {i} {padding}",
                "createdAt": "2023-11-14T22:13:20.000Z",
            }
            cid, block = dagcbor.encode_block(value)
            items.append((f"{COLLECTION}/{rkey}", cid))
            record_sections.append(dagcbor.car_section(cid, block))
        data, nodes = build_mst(items)
        rev = make_tid(START_MICROS + records * 1_000_000)
        commit = dagcbor.encode_commit(did, rev, data, 3, b"\x00" * 64)
        commit_cid = dagcbor.cid_for_block(commit)
        for part in (
            dagcbor.car_header([commit_cid]),
            dagcbor.car_section(commit_cid, commit),
            *(dagcbor.car_section(cid, block) for cid, block in nodes),
            *record_sections,
        ):
            car.write(part)
            size += len(part)
    return {"bytes": size, "records": records, "rev": rev, "data": dagcbor.cid_str(data)}


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
