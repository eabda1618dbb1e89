"""CIDs and strict DAG-CBOR: interop vectors, DASL strictness cases, NUL, depth, torture."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
from pathlib import Path

import cbor2
import libipld
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_support import FIXTURES, SHARED, dag_cbor, from_json_form

from firehose.protocol import cbor as cbor_mod
from firehose.protocol.cbor import MAX_RECORD_DEPTH, decode_json_form, decode_record
from firehose.protocol.cid import (
    PREFIX_DAG_CBOR,
    PREFIX_RAW,
    cid_bytes_for,
    cid_bytes_from_str,
    cid_for_dag_cbor,
    cid_str_from_bytes,
    cid_str_reference,
    verify_block,
)
from firehose.protocol.errors import REASONS, ProtocolError

CODEC_FIXTURES = sorted((FIXTURES / "ipld-codec-fixtures/fixtures").glob("*/*.dag-cbor"))
ATPROTO_TAGS = {"dag-cbor", "basic", "dasl-cid"}
# DASL invalid_in cases (atproto tags) that we accept on purpose: none.
ACCEPTED_INVALID: set[str] = set()
# DASL roundtrip cases we reject on purpose: BLAKE3 CIDs are DASL but not atproto, which
# allows only sha2-256 (https://atproto.com/specs/data-model#link-and-cid-formats).
REJECTED_ROUNDTRIP = {"cid:Big DASL CID"}


def strict(data: bytes) -> object:
    """The reference pure-Python decoder, bypassing the libipld fast path."""
    return cbor_mod._strict_decode(data, MAX_RECORD_DEPTH, [False])


def dasl_cases() -> list[tuple[str, dict[str, str]]]:
    out = []
    for path in sorted((FIXTURES / "dasl-testing/fixtures/cbor").glob("*.json")):
        for case in json.loads(path.read_text()):
            if set(case["tags"]) & ATPROTO_TAGS:
                out.append((f"{path.stem}:{case['name']}", case))
    return out


# --- CIDs ---


def test_cid_string_matches_reference_base32_and_round_trips() -> None:
    for data in (b"", b"x", bytes(range(256))):
        cid = cid_bytes_for(data)
        text = cid_str_from_bytes(cid)
        assert text == cid_str_reference(cid) == cid_for_dag_cbor(data)
        assert text.startswith("bafyrei") and cid_bytes_from_str(text) == cid
        assert verify_block(cid, data) and not verify_block(cid, data + b"!")
    raw = cid_bytes_for(b"blob", codec=0x55)
    assert cid_str_from_bytes(raw).startswith("bafkrei")


@given(st.sampled_from([PREFIX_DAG_CBOR, PREFIX_RAW]), st.binary(min_size=32, max_size=32))
def test_cid_string_is_what_libipld_writes_for_any_digest(prefix: bytes, digest: bytes) -> None:
    # cid.py spells CIDs with libipld's multibase encoder; libipld.encode_cid, which parses
    # the CID first, is the reference it must keep agreeing with (and the base32 one).
    cid = prefix + digest
    text = cid_str_from_bytes(cid)
    assert text == libipld.encode_cid(cid) == cid_str_reference(cid)
    assert cid_bytes_from_str(text) == cid


@pytest.mark.parametrize(
    ("cid", "reason"),
    [
        (b"\x12\x20" + bytes(32), "unsupported"),  # CIDv0
        (b"\x01\x70\x12\x20" + bytes(32), "unsupported"),  # dag-pb codec
        (b"\x01\x71\x11\x14" + bytes(20), "unsupported"),  # sha1
        (b"\x01\x71\x12\x1f" + bytes(31), "car"),  # short digest
        (b"\x01\x71\x12\x20" + bytes(33), "car"),  # trailing byte
        (b"\x01\x71", "car"),
        (b"", "car"),
        (b"\x81\x00\x71\x12\x20" + bytes(32), "car"),  # non-minimal varint
    ],
)
def test_bad_binary_cids_are_rejected(cid: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        cid_str_from_bytes(cid)
    assert err.value.reason == reason


def test_bad_cid_strings_are_rejected() -> None:
    good = cid_for_dag_cbor(b"x")
    for text in ("", "Q" + good[1:], good.upper(), good[:-1], good + "a", "b" + "1" * 58):
        with pytest.raises(ProtocolError):
            cid_bytes_from_str(text)


# --- interop round trips ---


def has_non_atproto_cid(obj: object) -> bool:
    """Independently (cbor2) find CID links atproto does not allow (v0, dag-pb, identity...)."""
    if isinstance(obj, cbor2.CBORTag):
        payload = obj.value
        return not (
            len(payload) == 37 and payload[:5] in (b"\x00\x01\x71\x12\x20", b"\x00\x01\x55\x12\x20")
        )
    if isinstance(obj, dict):
        return any(has_non_atproto_cid(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_non_atproto_cid(v) for v in obj)
    return False


@pytest.mark.parametrize("path", CODEC_FIXTURES, ids=lambda p: p.parent.name)
def test_ipld_codec_fixture_round_trips(path: Path) -> None:
    data = path.read_bytes()
    assert cid_for_dag_cbor(data) == path.stem
    if has_non_atproto_cid(cbor2.loads(data)):
        # Valid generic DAG-CBOR, but atproto only allows CIDv1 dag-cbor/raw sha2-256 links
        # (https://atproto.com/specs/data-model#link-and-cid-formats): rejected on purpose.
        libipld.decode_dag_cbor(data)
        with pytest.raises(ProtocolError) as err:
            decode_json_form(data)
        assert err.value.reason == "cbor" and "CID" in err.value.detail
        return
    value, sanitized = decode_json_form(data)
    assert not sanitized
    assert dag_cbor(from_json_form(value)) == data
    assert strict(data) == value


def test_data_model_fixtures_json_cbor_cid() -> None:
    cases = json.loads((FIXTURES / "interop-tests/data-model/data-model-fixtures.json").read_text())
    assert len(cases) == 3
    for case in cases:
        data = base64.b64decode(case["cbor_base64"] + "=" * (-len(case["cbor_base64"]) % 4))
        assert cid_for_dag_cbor(data) == case["cid"]
        value, _ = decode_record(data)
        assert value == case["json"]
        assert dag_cbor(from_json_form(case["json"])) == data


def test_duplicate_keys_negative_fixture_rejected() -> None:
    path = FIXTURES / "ipld-codec-fixtures/negative-fixtures/dag-cbor/decode/duplicate-keys.json"
    for case in json.loads(path.read_text()):
        with pytest.raises(ProtocolError) as err:
            decode_json_form(bytes.fromhex(case["hex"]))
        assert err.value.reason == "cbor"


@pytest.mark.parametrize(("name", "case"), dasl_cases(), ids=[n for n, _ in dasl_cases()])
def test_dasl_cases(name: str, case: dict[str, str]) -> None:
    data = bytes.fromhex(case["data"])
    if case["type"] == "roundtrip" and name in REJECTED_ROUNDTRIP:
        with pytest.raises(ProtocolError):
            decode_json_form(data)
    elif case["type"] == "roundtrip":
        value, _ = decode_json_form(data)
        assert strict(data) == value
        assert dag_cbor(from_json_form(value)) == data
    elif case["type"] == "invalid_in" and name not in ACCEPTED_INVALID:
        with pytest.raises(ProtocolError) as err:
            decode_json_form(data)
        assert err.value.reason == "cbor"
        with pytest.raises(ProtocolError):
            strict(data)


def test_dasl_case_counts_match_readme() -> None:
    kinds = [c["type"] for _, c in dasl_cases()]
    assert (kinds.count("roundtrip"), kinds.count("invalid_in")) == (23, 60)


# --- records ---


def test_real_records_decode_to_json_form() -> None:
    data = (FIXTURES / "indigo/testing/testdata/feedpost_record.cbor").read_bytes()
    record, sanitized = decode_record(data)
    assert not sanitized and record["$type"] == "app.bsky.feed.post"
    image = record["embed"]["media"]["images"][0]["image"]
    assert image["ref"] == {"$link": "bafkreieqq463374bbcbeq7gpmet5rvrpeqow6t4rtjzrkhnlumdylagaqa"}
    assert strict(data) == record
    richtext = (FIXTURES / "indigo/testing/testdata/post_richtext_link.cbor").read_bytes()
    assert decode_record(richtext)[0] == strict(richtext)


def test_links_and_bytes_stay_distinct() -> None:
    link = cid_bytes_for(b"target")
    # A byte string that happens to be a valid CID must stay bytes (libipld cannot tell).
    data = dag_cbor({"a": cbor2.CBORTag(42, b"\x00" + link), "b": link, "c": b"\x00\x01"})
    record, _ = decode_record(data)
    assert record == {
        "a": {"$link": cid_str_from_bytes(link)},
        "b": {"$bytes": base64.b64encode(link).decode().rstrip("=")},
        "c": {"$bytes": "AAE"},
    }


def test_nul_is_replaced_everywhere_and_reported() -> None:
    data = dag_cbor({"te\x00xt": "a\x00b", "list": ["\x00"], "ok": "fine"})
    record, sanitized = decode_record(data)
    assert sanitized
    assert record == {"te\ufffdxt": "a\ufffdb", "list": ["\ufffd"], "ok": "fine"}
    assert strict(data) == record
    assert decode_record(dag_cbor({"text": "clean"})) == ({"text": "clean"}, False)


def test_records_must_be_maps() -> None:
    values: list[object] = [[], "s", 1, None]
    for value in values:
        with pytest.raises(ProtocolError):
            decode_record(dag_cbor(value))


def nested(depth: int) -> bytes:
    return b"\x81" * (depth - 1) + b"\xa0"  # [[[...{}...]]]


def test_nesting_is_bounded() -> None:
    decode_json_form(nested(MAX_RECORD_DEPTH))
    strict(nested(MAX_RECORD_DEPTH))
    for data in (nested(MAX_RECORD_DEPTH + 1), nested(100_000), b"\xa1\x61a" * 5000 + b"\xa0"):
        with pytest.raises(ProtocolError) as err:
            decode_json_form(data)
        assert err.value.reason == "cbor"


def test_libipld_torture_inputs_fail_fast() -> None:
    paths = [FIXTURES / "libipld-sdist-3.5.0/data/semi_torture_nested_lists.dagcbor.gz"]
    paths += sorted((SHARED / "libipld-sdist-3.5.0/data").glob("torture_nested_*.gz"))
    for path in paths:
        data = gzip.decompress(path.read_bytes())
        start = time.perf_counter()
        with pytest.raises(ProtocolError) as err:
            decode_json_form(data)
        assert err.value.reason == "cbor"
        assert time.perf_counter() - start < 2.0
        with pytest.raises(ProtocolError):
            cbor_mod.decode_block(data)


def test_torture_cids_decode_in_bounded_time() -> None:
    path = SHARED / "libipld-sdist-3.5.0/data/torture_cids.dagcbor.gz"
    if not path.exists():
        pytest.skip("../shared/atproto-vectors not present (4 MB input not copied)")
    data = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(data).hexdigest().startswith("aacabfb3")
    start = time.perf_counter()
    value, _ = decode_json_form(data)
    assert len(value) == 100_000 and time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "data",
    [b"", b"\xa1", b"\xa1\x61", b"\x7f", b"\xff", b"\x1c", b"\xd8", b"\xd8\x2a", b"\xfb\x00"],
)
def test_truncated_or_reserved_input(data: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_json_form(data)
    assert err.value.reason == "cbor"


def test_error_shape() -> None:
    err = ProtocolError("car", "x" * 1000)
    assert err.reason in REASONS and len(err.detail) <= 200
    assert ProtocolError("nonsense", "y").reason in REASONS
    assert libipld  # the fast path's dependency is importable


def test_plain_bytes_take_the_fast_path_and_match_the_strict_decoder() -> None:
    # A byte string that is not a CID: libipld's encoder spells it as bytes, so the fast
    # path can emit {"$bytes": ...} itself; the reference decoder must agree.
    data = dag_cbor({"blob": b"\x00\x01\x02", "empty": b"", "n": [b"\xff" * 40]})
    calls: list[bytes] = []
    real = cbor_mod._strict_decode

    def spy(raw: bytes, depth: int, flags: list[bool]) -> object:
        calls.append(raw)
        return real(raw, depth, flags)

    cbor_mod._strict_decode = spy  # type: ignore[assignment]
    try:
        record, sanitized = decode_record(data)
    finally:
        cbor_mod._strict_decode = real  # type: ignore[assignment]
    assert not calls and not sanitized
    assert record == {
        "blob": {"$bytes": "AAEC"},
        "empty": {"$bytes": ""},
        "n": [{"$bytes": base64.b64encode(b"\xff" * 40).decode().rstrip("=")}],
    }
    assert strict(data) == record
