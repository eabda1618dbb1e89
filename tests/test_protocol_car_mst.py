"""CAR reading (hash checks, truncation, limits, streaming) and MST walks over real repos."""

from __future__ import annotations

import base64
import itertools
import json

import libipld
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_protocol_support import FIXTURES, PARTIAL_CAR, REPO_CARS, from_json_form

from firehose.protocol.car import CarStreamReader, read_car
from firehose.protocol.cid import cid_bytes_from_str, cid_for_dag_cbor
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import iter_repo_records, mst_key_height, read_commit, walk_mst


def car_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


ALL_CARS = [*REPO_CARS, PARTIAL_CAR]


@pytest.mark.parametrize("name", ALL_CARS)
def test_real_cars_read_with_hashes_checked(name: str) -> None:
    data = car_bytes(name)
    car = read_car(data)
    assert car.root_cid in car.blocks and car.root == cid_for_dag_cbor(car.blocks[car.root_cid])
    for cid, block in car.blocks.items():
        assert cid_bytes_from_str(cid_for_dag_cbor(block)) == cid
    # The same CAR fed to the streaming reader in awkward chunks gives the same blocks.
    for chunk in (1, 7, 100, 4096):
        reader = CarStreamReader()
        got: dict[bytes, bytes] = {}
        for i in range(0, len(data), chunk):
            got.update(reader.feed(data[i : i + chunk]))
        reader.close()
        assert got == car.blocks and reader.root == car.root


@pytest.mark.parametrize("name", ALL_CARS)
def test_flipped_block_byte_is_rejected(name: str) -> None:
    data = bytearray(car_bytes(name))
    data[-1] ^= 0x01  # last byte of the last block's data
    with pytest.raises(ProtocolError) as err:
        read_car(bytes(data))
    assert err.value.reason == "block_hash"
    reader = CarStreamReader()
    with pytest.raises(ProtocolError) as err:
        reader.feed(bytes(data))
    assert err.value.reason == "block_hash"


@pytest.mark.parametrize("name", ALL_CARS)
def test_truncated_car_is_rejected(name: str) -> None:
    data = car_bytes(name)
    for cut in (1, 5, 37, len(data) // 2, len(data) - 1):
        with pytest.raises(ProtocolError) as err:
            read_car(data[:cut])
        assert err.value.reason == "car"
        reader = CarStreamReader()
        with pytest.raises(ProtocolError):
            reader.feed(data[:cut])
            reader.close()


def test_empty_roots_car_is_rejected() -> None:
    data = car_bytes("ipld-codec-fixtures/fixtures.car")
    with pytest.raises(ProtocolError) as err:
        read_car(data)
    assert err.value.reason == "car" and "one root" in err.value.detail
    with pytest.raises(ProtocolError):
        CarStreamReader().feed(data)


def test_limits() -> None:
    data = car_bytes("indigo/testing/testdata/divy.repo")
    with pytest.raises(ProtocolError) as err:
        read_car(data, max_block_bytes=16)
    assert err.value.reason == "too_large"
    with pytest.raises(ProtocolError) as err:
        read_car(data, max_blocks=2)
    assert err.value.reason == "too_large"
    for junk in (b"", b"\x00", b"\xff" * 12, b"\x05abc"):
        with pytest.raises(ProtocolError):
            read_car(junk)


def test_duplicate_blocks_allowed() -> None:
    car = read_car(car_bytes("indigo/testing/testdata/fakermaker.repo.car"))
    assert len(car.blocks) == 682  # 690 sections, 8 duplicates


def test_atproto_ts_car_fixture() -> None:
    cases = json.loads(
        (FIXTURES / "atproto-ts/packages/repo/tests/car-file-fixtures.json").read_text()
    )
    for case in cases:
        car = read_car(base64.b64decode(case["car"]))
        assert car.root == case["root"]
        assert len(car.blocks) == len(case["blocks"])
        for block in case["blocks"]:
            assert cid_bytes_from_str(block["cid"]) in car.blocks


@pytest.mark.parametrize("name", list(REPO_CARS))
def test_mst_walk_record_counts(name: str) -> None:
    version, count = REPO_CARS[name]
    car = read_car(car_bytes(name))
    info, records = iter_repo_records(car)
    assert info.version == version and info.cid == car.root
    rows = list(records)
    assert len(rows) == count
    keys = [f"{c}/{r}" for c, r, _, _ in rows]
    assert keys == sorted(keys, key=str.encode)
    assert all(isinstance(rec, dict) for *_, rec in rows)


def test_snarfed2_records_equal_arroba_json() -> None:
    car = read_car(car_bytes("arroba/arroba/tests/snarfed2.car"))
    info, records = iter_repo_records(car)
    assert info.did == "did:plc:5zspv27pk4iqtrl2ql2nykjh"
    expected = json.loads((FIXTURES / "arroba/arroba/tests/snarfed2.json").read_text())
    ours = {(c, r): from_json_form(rec) for c, r, _, rec in records}
    # arroba's file is {collection: {rkey: record}} with links as {"/": cid}; compare both
    # in one link form (cbor2 values).
    theirs = {
        (c, r): from_json_form(rec) for c, recs in expected.items() for r, rec in recs.items()
    }
    assert ours == theirs and len(ours) == 5


def test_partial_repo_walk_raises_missing_block() -> None:
    car = read_car(car_bytes(PARTIAL_CAR))
    _info, records = iter_repo_records(car)
    with pytest.raises(ProtocolError) as err:
        list(records)
    assert err.value.reason == "missing_block"


def test_walk_mst_accepts_string_root_and_reports_missing_root() -> None:
    car = read_car(car_bytes("rsky/rsky-repo/resources/test/valid_repo.car"))
    info = read_commit(car)
    assert len(list(walk_mst(info.data_cid, car.blocks.get))) == 6
    with pytest.raises(ProtocolError) as err:
        empty: dict[bytes, bytes] = {}
        list(walk_mst(info.data_cid, empty.get))
    assert err.value.reason == "missing_block"


def test_key_heights() -> None:
    cases = json.loads((FIXTURES / "interop-tests/mst/key_heights.json").read_text())
    assert len(cases) == 9
    for case in cases:
        assert mst_key_height(case["key"]) == case["height"]


# Keys out of order: walk_mst compares the decoded str keys, which must give the spec's
# UTF-8 byte order (https://atproto.com/specs/repository#mst-structure).
_VALUE = cid_bytes_from_str(cid_for_dag_cbor(b"\xa0"))  # any record CID: never fetched


def _one_node_tree(*keys: str) -> tuple[bytes, dict[bytes, bytes]]:
    """An MST of one node holding `keys` in the given order (no prefix compression)."""
    node = {"l": None, "e": [{"p": 0, "k": k.encode(), "v": _VALUE, "t": None} for k in keys]}
    block = libipld.encode_dag_cbor(node)
    cid = cid_bytes_from_str(cid_for_dag_cbor(block))
    return cid, {cid: block}


def test_keys_out_of_order_or_repeated_are_refused() -> None:
    root, blocks = _one_node_tree("app.bsky.feed.post/a", "app.bsky.feed.post/b")
    assert [k for k, _ in walk_mst(root, blocks.get)] == [
        "app.bsky.feed.post/a",
        "app.bsky.feed.post/b",
    ]
    for keys in (("b/1", "a/1"), ("a/1", "a/1")):
        root, blocks = _one_node_tree(*keys)
        with pytest.raises(ProtocolError, match="out of order"):
            list(walk_mst(root, blocks.get))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=["Cs"]), min_size=1), min_size=2))
# UTF-16 order (surrogates below U+E000) would put these two the other way round.
@example(["\uff61", "\U00010000"])
@example(["\U00010000", "\uff61"])
def test_key_order_is_utf8_byte_order(keys: list[str]) -> None:
    root, blocks = _one_node_tree(*keys)
    encoded = [k.encode() for k in keys]
    increasing = all(a < b for a, b in itertools.pairwise(encoded))
    try:
        walked = [k for k, _ in walk_mst(root, blocks.get)]
    except ProtocolError as exc:
        assert not increasing and "out of order" in exc.detail
    else:
        assert increasing and walked == keys
