"""The fuzz seed corpus: real bytes from the public atproto test vectors, per target.

Seeds are what mutation starts from, so they are real traffic and real repositories:

* frames: the captured relay frames of indigo's relay scenarios (DAG-JSON, encoded here
  with cbor2, an encoder independent of the decoder), the production ``#commit`` bodies,
  plus one frame of every other kind the decoder handles (error, ``#info``, legacy types);
* cars: the real repository CARs of the vectors' README, the ``car-file-fixtures.json``
  CAR of the TypeScript implementation, ipld's ``fixtures.car`` (no root: must be refused),
  and the 128 MST-only CARs of DavidBuchanan314/mst-test-suite;
* records: single DAG-CBOR records, every record block of the repository CARs, the
  ipld codec fixtures and the DASL CBOR cases (valid and invalid).

Everything is read from ``tests/fixtures`` and ``tests/fuzz/corpus`` (copies with their
licences), never from ``../shared``, so the fuzz tests run on a bare clone. Loaders are
cached: the corpus is built once per process.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
from functools import cache
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run by hand (atheris): make the test helpers importable
    sys.path.insert(0, str(TESTS))

from test_protocol_support import (  # noqa: E402
    FIXTURES,
    REPO_CARS,
    commit_bodies,
    dag_cbor,
    frame,
    relay_frames,
)

from firehose.protocol.car import read_car  # noqa: E402
from firehose.protocol.cid import cid_bytes_from_str  # noqa: E402
from firehose.protocol.mst import read_commit, walk_mst  # noqa: E402

LOCAL = Path(__file__).parent / "corpus"
MST_SUITE_CARS = LOCAL / "mst-test-suite/cars/exhaustive"
TORTURE = LOCAL / "libipld-sdist-3.5.0/data"
# Seeds bigger than this are left out of the mutation pool (fakermaker.repo.car, 235 KB):
# re-hashing a repo that size costs more per example than it finds, and the other repos
# (0.8-138 KB, v2 and v3) exercise the same code paths.
MAX_SEED_BYTES = 200_000


@cache
def frame_seeds() -> tuple[bytes, ...]:
    """Binary subscribeRepos frames: real relay captures, production commits, every kind."""
    seeds = relay_frames()
    seeds += [frame({"op": 1, "t": "#commit"}, body) for _, body in commit_bodies()]
    did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    seeds += [
        frame({"op": -1}, {"error": "FutureCursor", "message": "cursor in the future"}),
        frame({"op": 1, "t": "#info"}, {"name": "OutdatedCursor", "message": "too old"}),
        frame({"op": 1, "t": "#handle"}, {"seq": 7, "did": did, "handle": "a.example.com"}),
        frame({"op": 1, "t": "#tombstone"}, {"seq": 8, "did": did, "time": "2024-01-01T00:00:00Z"}),
        frame({"op": 1, "t": "#labels"}, {"seq": 9, "labels": []}),
    ]
    return tuple(seeds)


def _ts_fixture_cars() -> list[bytes]:
    path = FIXTURES / "atproto-ts/packages/repo/tests/car-file-fixtures.json"
    return [_b64(case["car"]) for case in json.loads(path.read_text())]


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@cache
def repo_cars() -> tuple[bytes, ...]:
    """Real repository exports (commit at the root), smallest first."""
    cars = [(FIXTURES / name).read_bytes() for name in REPO_CARS]
    return tuple(sorted((c for c in cars if len(c) <= MAX_SEED_BYTES), key=len))


@cache
def mst_cars() -> tuple[bytes, ...]:
    """mst-test-suite CARs: the root is an MST node, records are absent (only their CIDs)."""
    return tuple(p.read_bytes() for p in sorted(MST_SUITE_CARS.glob("*.car")))


@cache
def car_seeds() -> tuple[bytes, ...]:
    """Every CAR seed: repositories, MST-only CARs, the TS fixture and a rootless CAR."""
    rootless = (FIXTURES / "ipld-codec-fixtures/fixtures.car").read_bytes()
    return repo_cars() + mst_cars() + tuple(_ts_fixture_cars()) + (rootless,)


@cache
def record_seeds() -> tuple[bytes, ...]:
    """DAG-CBOR objects: records from the repos, single records, codec fixtures, DASL cases."""
    seeds: list[bytes] = [
        (FIXTURES / "indigo/testing/testdata/feedpost_record.cbor").read_bytes(),
        (FIXTURES / "indigo/testing/testdata/post_richtext_link.cbor").read_bytes(),
    ]
    for data in repo_cars():
        seeds += _record_blocks(data)
    seeds += [
        p.read_bytes() for p in sorted(FIXTURES.glob("ipld-codec-fixtures/fixtures/*/*.dag-cbor"))
    ]
    for path in sorted((FIXTURES / "dasl-testing/fixtures/cbor").glob("*.json")):
        seeds += [bytes.fromhex(case["data"]) for case in json.loads(path.read_text())]
    seeds.append(dag_cbor({"$type": "app.bsky.feed.post", "text": "nul \x00 here"}))
    unique = dict.fromkeys(s for s in seeds if len(s) <= MAX_SEED_BYTES)
    return tuple(unique)


def _record_blocks(data: bytes) -> list[bytes]:
    """The record blocks of a repository CAR: every MST value present in the CAR."""
    car = read_car(data)
    root = cid_bytes_from_str(read_commit(car).data_cid)
    found = sorted({cid for _, cid in walk_mst(root, car.blocks.get)})
    return [car.blocks[cid] for cid in found if cid in car.blocks]


@cache
def handle_answer_seeds() -> tuple[bytes, ...]:
    """What a handle check reads (backfill/handle_rules.py): the interop DID syntax vectors
    (valid and invalid) as well-known bodies (bare, with whitespace, with a second line) and
    as DNS TXT ``did=`` records."""
    syntax = TESTS / "fixtures" / "interop-tests" / "syntax"
    dids = [
        line.strip().encode()
        for name in ("did_syntax_valid.txt", "did_syntax_invalid.txt")
        for line in (syntax / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    seeds: list[bytes] = []
    for did in dids:
        seeds += [did, b"  " + did + b"\r\n", did + b"\nnext", b"did=" + did]
    return tuple(seeds)


def torture_inputs() -> dict[str, bytes]:
    """libipld's DoS inputs (data/*.dagcbor of the libipld 3.5.0 sdist), by name.

    The two nesting bombs are copied (gzip: 10 and 19 KB); the 3 MB ``torture_cids`` is
    rebuilt (an array of the raw-codec CIDs of sha256(str(i)) for i < 100,000) and checked
    against the sha256 the vectors' MANIFEST gives for the original.
    """
    out = {
        path.name.removesuffix(".dagcbor.gz"): gzip.decompress(path.read_bytes())
        for path in sorted(TORTURE.glob("*.dagcbor.gz"))
    }
    semi = FIXTURES / "libipld-sdist-3.5.0/data/semi_torture_nested_lists.dagcbor.gz"
    out["semi_torture_nested_lists"] = gzip.decompress(semi.read_bytes())
    out["torture_cids"] = torture_cids()
    return out


TORTURE_SHA256 = {
    "semi_torture_nested_lists": "013d53ec8332796c4e7004b6cc9c098c445b5f6c34084ecd3696c1a91e93e873",
    "torture_cids": "aacabfb3e66118876687e9864234af3d92b85c1b454d5aedabd217bad2d6d31e",
    "torture_nested_lists": "7195c6c8fad85fd54254bf6691e7236df3919feaeee608e299fcef54a545b876",
    "torture_nested_maps": "8b79da85638d56cce3a1a78f064ffc17ee170207d16a8e8578ac67c3bba810b5",
}


def torture_cids() -> bytes:
    count = 100_000
    parts = [b"\x9a" + count.to_bytes(4, "big")]  # array, 4-byte length
    tag = b"\xd8\x2a\x58\x25\x00\x01\x55\x12\x20"  # tag 42, bytes(37), 0x00, CIDv1 raw sha256
    parts += [tag + hashlib.sha256(str(i).encode()).digest() for i in range(count)]
    return b"".join(parts)
