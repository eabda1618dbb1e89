"""libipld's DoS inputs through every entry point that could receive such bytes.

Run as a script (``python tests/fuzz/torture.py``) it prints one JSON object: per input and
entry point, the seconds taken and the outcome (the value's type or the error's reason), and
the process's peak RSS growth. tests/test_fuzz_torture.py runs it in a fresh subprocess so
the peak RSS belongs to these inputs alone.

Entry points: the record decoder (fast path and strict), the known-schema block decoder
(commits, MST nodes), a frame whose header or body is the input, a ``#commit`` frame whose
record block is the input (re-hashed so the CAR verifies), a repository CAR whose record
block or MST root node is the input, read whole and streamed. Each runs with the default
limits, which refuse these sizes early (``too_large``), and again with every size limit
raised to 64 MiB, so that the decoders themselves meet the hostile bytes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libipld

from firehose.protocol.car import Car, CarStreamReader, read_car
from firehose.protocol.cbor import decode_block, decode_json_form, decode_record
from firehose.protocol.cid import CID_BYTES, cid_bytes_from_str
from firehose.protocol.errors import ProtocolError
from firehose.protocol.frames import FrameLimits, decode_frame
from firehose.protocol.mst import iter_repo_records, read_commit, walk_mst
from fuzz.corpus import frame_seeds, repo_cars, torture_inputs
from fuzz.mutations import _relink, car_sections, rehash_car

BIG = 64 * 1024 * 1024
RAISED = FrameLimits(
    max_frame_bytes=BIG, max_blocks_bytes=BIG, max_block_bytes=BIG, max_blocks=100_000
)
COMMIT_HEADER = libipld.encode_dag_cbor({"op": 1, "t": "#commit"})


def outcome(fn: Callable[[], Any]) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        value = fn()
    except ProtocolError as err:
        return time.perf_counter() - start, f"error:{err.reason}"
    if isinstance(value, tuple):
        value = value[0]
    return time.perf_counter() - start, f"value:{type(value).__name__}"


def _commit_frame_with_record(record: bytes) -> bytes:
    """A real captured #commit frame whose first record block is replaced by `record`."""
    for data in frame_seeds():
        header, body = libipld.decode_dag_cbor_multi(data)
        ops = body.get("ops") if header.get("t") == "#commit" else None
        creates = [op for op in ops or () if op.get("action") == "create"]
        if creates:
            break
    car = body["blocks"]
    index = next(
        i
        for i, (_, start, _) in enumerate(car_sections(car)[1:])
        if car[start : start + CID_BYTES] == creates[0]["cid"]
    )
    new_car, mapping = rehash_car(car, index, record)
    body = _relink(body, mapping)
    body["blocks"] = new_car
    return bytes(COMMIT_HEADER + libipld.encode_dag_cbor(body))


def _repo_with(block: bytes, replace: str) -> bytes:
    """The smallest real repository CAR with its first record block or MST root replaced."""
    data = min(repo_cars(), key=len)
    car = read_car(data)
    info, records = iter_repo_records(car)
    target = next(records)[2] if replace == "record" else info.data_cid
    cid = cid_bytes_from_str(target)
    sections = car_sections(data)[1:]
    index = next(i for i, (_, s, _) in enumerate(sections) if data[s : s + CID_BYTES] == cid)
    return rehash_car(data, index, block)[0]


def _stream(data: bytes, max_block_bytes: int = BIG) -> int:
    reader = CarStreamReader(max_block_bytes=max_block_bytes)
    count = 0
    for i in range(0, len(data), 1 << 20):
        count += len(reader.feed(data[i : i + (1 << 20)]))
    reader.close()
    return count


def _walk(data: bytes, max_block_bytes: int) -> int:
    car = read_car(data, max_block_bytes=max_block_bytes)
    _info, records = iter_repo_records(car)
    return sum(1 for _ in records)


def _walk_root(data: bytes) -> int:
    car: Car = read_car(data, max_block_bytes=BIG)
    info = read_commit(car)
    return sum(1 for _ in walk_mst(cid_bytes_from_str(info.data_cid), car.blocks.get))


def entry_points(data: bytes) -> dict[str, Callable[[], Any]]:
    commit = _commit_frame_with_record(data)
    record_car = _repo_with(data, "record")
    node_car = _repo_with(data, "mst")
    return {
        "record": lambda: decode_record(data),
        "json_form": lambda: decode_json_form(data),
        "block": lambda: decode_block(data),
        "frame_body": lambda: decode_frame(COMMIT_HEADER + data),
        "frame_body_raised": lambda: decode_frame(COMMIT_HEADER + data, RAISED),
        "frame_header_raised": lambda: decode_frame(data + COMMIT_HEADER, RAISED),
        "commit_record": lambda: _commit_ops(decode_frame(commit)),
        "commit_record_raised": lambda: _commit_ops(decode_frame(commit, RAISED)),
        "car_record": lambda: _walk(record_car, 1 << 20),
        "car_record_raised": lambda: _walk(record_car, BIG),
        "car_record_stream": lambda: _stream(record_car, 1 << 20),
        "car_record_stream_raised": lambda: _stream(record_car),
        "car_mst_node_raised": lambda: _walk_root(node_car),
    }


def _commit_ops(event: Any) -> Any:
    """The op whose record is the torture input lands in invalid_ops, with its reason."""
    if event.invalid_ops:
        raise ProtocolError(event.invalid_ops[0][0], "invalid op")
    return event


def peak_rss_kb() -> int:
    """This address space's peak RSS (VmHWM), in KiB.

    Not ``getrusage().ru_maxrss``: Linux carries that high-water mark across fork and exec,
    so a child of a large pytest process starts with its parent's peak and a run that stays
    below it reads as zero growth (seen in CI after 13 minutes of tests).
    """
    found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if found is None:
        raise RuntimeError("no VmHWM in /proc/self/status: Linux is needed to measure RSS")
    return int(found.group(1))


def run() -> dict[str, Any]:
    base_kb = peak_rss_kb()
    results: dict[str, Any] = {}
    for name, data in torture_inputs().items():
        results[name] = {entry: outcome(fn) for entry, fn in entry_points(data).items()}
    peak_kb = peak_rss_kb()
    return {"results": results, "rss_growth_mb": (peak_kb - base_kb) / 1024}


if __name__ == "__main__":
    print(json.dumps(run()))
