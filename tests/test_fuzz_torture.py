"""Denial-of-service inputs: bounded time, bounded memory, a typed outcome.

libipld's torture inputs (10 MB of nested lists, 20 MB of nested maps, 100,000 CIDs, a
3 KB semi-torture) go through every entry point that could receive such bytes (see
tests/fuzz/torture.py), in a fresh subprocess so that its peak RSS measures them alone.
Crafted hostile structures that a byte mutator would not stumble on are here too.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from fuzz.corpus import TORTURE_SHA256, torture_inputs
from test_protocol_support import dag_cbor

from firehose.protocol.cid import PREFIX_DAG_CBOR
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import walk_mst

TORTURE_SCRIPT = Path(__file__).parent / "fuzz" / "torture.py"
MAX_SECONDS = 2.0  # per input and entry point; they take 1-500 ms on an idle 2-core machine
# Peak RSS growth over the whole run. The inputs are 34 MB and a few entry points copy
# them (a frame around them, a re-hashed CAR): ~160 MB measured. A decoder that built
# Python objects for the 10-20 million nesting levels would need gigabytes.
MAX_RSS_GROWTH_MB = 256
# A safety net so a runaway decoder fails this test instead of the machine.
ADDRESS_SPACE_LIMIT_BYTES = 4 * 1024**3


def test_torture_inputs_are_the_published_bytes() -> None:
    inputs = torture_inputs()
    assert sorted(inputs) == sorted(TORTURE_SHA256)
    for name, data in inputs.items():
        assert hashlib.sha256(data).hexdigest() == TORTURE_SHA256[name], name


@pytest.fixture(scope="module")
def torture_run() -> dict[str, object]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT_BYTES,) * 2)

    proc = subprocess.run(
        [sys.executable, str(TORTURE_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_every_entry_point_fails_fast_with_a_typed_error(torture_run: dict) -> None:
    results = torture_run["results"]
    assert len(results) == 4
    for name, entries in results.items():
        assert len(entries) == 13
        for entry, (seconds, outcome) in entries.items():
            assert seconds < MAX_SECONDS, (name, entry, seconds)
            kind = outcome.partition(":")[0]
            # A value is acceptable only where the bytes are acceptable: the CID array is
            # valid DAG-CBOR (but not a record), and the streaming reader only hash-checks.
            if kind == "value":
                assert name == "torture_cids" or entry.startswith("car_record_stream"), (
                    name,
                    entry,
                    outcome,
                )
            else:
                assert kind == "error", (name, entry, outcome)
    nested = results["torture_nested_maps"]
    assert nested["record"][1] == "error:cbor"
    assert nested["frame_body"][1] == "error:too_large"  # the frame size cap comes first
    assert nested["commit_record_raised"][1] == "error:cbor"
    assert results["torture_cids"]["record"][1] == "error:cbor"  # a list is not a record


def test_peak_memory_is_bounded(torture_run: dict) -> None:
    assert 0 < torture_run["rss_growth_mb"] < MAX_RSS_GROWTH_MB


def test_peak_rss_is_the_childs_own_after_a_large_parent_forks() -> None:
    """The regression behind a zero growth in CI: ru_maxrss inherited the parent's peak."""
    ballast = b"\x01" * (300 * 1024 * 1024)  # touched pages: this process's RSS grows 300 MB
    proc = subprocess.run(
        [sys.executable, "-c", "from fuzz.torture import peak_rss_kb; print(peak_rss_kb())"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: None,  # forces fork + exec, as the torture fixture does
        cwd=Path(__file__).parent,
        check=True,
    )
    del ballast
    assert 0 < int(proc.stdout) < 150 * 1024, proc.stdout


def _link(cid: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(42, b"\x00" + cid)


def _put(blocks: dict[bytes, bytes], obj: object) -> bytes:
    data = dag_cbor(obj)
    cid = PREFIX_DAG_CBOR + hashlib.sha256(data).digest()
    blocks[cid] = data
    return cid


def test_mst_reusing_a_keyless_subtree_cannot_make_the_walk_quadratic() -> None:
    """1,000 entries each pointing at the same chain of 1,000 empty nodes: a 200 KB CAR
    that made the walker visit a million nodes (9 s) before empty nodes below the root
    were refused (the spec allows an empty node only as the root of an empty repo)."""
    blocks: dict[bytes, bytes] = {}
    chain = _put(blocks, {"e": [], "l": None})
    for _ in range(999):
        chain = _put(blocks, {"e": [], "l": _link(chain)})
    record = _put(blocks, {"$type": "app.bsky.feed.like"})
    entries = [
        {
            "k": f"app.bsky.feed.like/{i:013d}".encode(),
            "p": 0,
            "t": _link(chain),
            "v": _link(record),
        }
        for i in range(1000)
    ]
    root = _put(blocks, {"e": entries, "l": None})
    start = time.perf_counter()
    with pytest.raises(ProtocolError) as err:
        list(walk_mst(root, blocks.get))
    assert err.value.reason == "body"
    assert time.perf_counter() - start < 0.5


def test_mst_empty_root_and_empty_intermediate_nodes_stay_valid() -> None:
    """What the spec allows: an empty repo's root, and entry-less nodes that only point
    down (a gap between key heights)."""
    blocks: dict[bytes, bytes] = {}
    assert list(walk_mst(_put(blocks, {"e": [], "l": None}), blocks.get)) == []
    record = _put(blocks, {"$type": "app.bsky.feed.like"})
    leaf = _put(
        blocks, {"e": [{"k": b"a.b.c/x", "p": 0, "t": None, "v": _link(record)}], "l": None}
    )
    middle = _put(blocks, {"e": [], "l": _link(leaf)})
    top = _put(blocks, {"e": [], "l": _link(middle)})
    assert [key for key, _ in walk_mst(top, blocks.get)] == ["a.b.c/x"]
