"""firehose.protocol.signature: keys, strict ECDSA, commit signatures, on public vectors.

Vectors (tests/fixtures, see its README): the interop crypto fixtures, the w3c did:key
fixtures, every commit of the indigo relay scenarios (25 #commit + 1 #sync, signed by the
scenario's account key), real repository CARs with their legacy DID documents.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocol_support import FIXTURES, b64decode_loose, cid_bytes

from backfill.identity import parse_did_document
from firehose.devnet.keys import SigningKey
from firehose.protocol.car import read_car
from firehose.protocol.signature import (
    _ORDER,
    CURVE_K256,
    CURVE_P256,
    CommitFormatError,
    KeyFormatError,
    base58btc_decode,
    base58btc_encode,
    load_key,
    parse_did_key,
    parse_multikey,
    split_signed_commit,
    verify_commit,
    verify_signature,
)

CRYPTO = FIXTURES / "interop-tests/crypto"
TESTDATA = FIXTURES / "indigo/testing/testdata"
SCENARIOS = FIXTURES / "indigo/cmd/relay/testing/testdata"


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def signature_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CRYPTO / "signature-fixtures.json").read_text())
    return cases


@pytest.mark.parametrize("case", signature_cases(), ids=lambda c: c["comment"][:60])
def test_interop_signature_fixtures(case: dict[str, Any]) -> None:
    key = parse_did_key(case["publicKeyDid"])
    # The same key in the legacy DID-document form: a bare point, the curve in the suite.
    assert parse_multikey(case["publicKeyMultibase"], case["didDocSuite"]) == key
    assert key.curve == {"ES256": CURVE_P256, "ES256K": CURVE_K256}[case["algorithm"]]
    assert key.did_key == case["publicKeyDid"]
    message, signature = b64(case["messageBase64"]), b64(case["signatureBase64"])
    assert verify_signature(key, message, signature) is case["validSignature"]
    if "high-s" in case["tags"]:
        # Refused for being high-S, not for being wrong: its low-S twin verifies.
        r, s = signature[:32], int.from_bytes(signature[32:], "big")
        twin = r + (_ORDER[key.curve] - s).to_bytes(32, "big")
        assert verify_signature(key, message, twin)


def test_signature_fixtures_cover_both_curves_and_both_refusals() -> None:
    cases = signature_cases()
    assert len(cases) == 6
    assert {c["algorithm"] for c in cases if c["validSignature"]} == {"ES256", "ES256K"}
    assert sorted(t for c in cases for t in c["tags"]) == ["der-encoded"] * 2 + ["high-s"] * 2


def w3c_cases() -> list[tuple[str, int, str]]:
    out = []
    for case in json.loads((CRYPTO / "w3c_didkey_K256.json").read_text()):
        out.append((CURVE_K256, int(case["privateKeyBytesHex"], 16), case["publicDidKey"]))
    for case in json.loads((CRYPTO / "w3c_didkey_P256.json").read_text()):
        secret = int.from_bytes(base58btc_decode(case["privateKeyBytesBase58"]), "big")
        out.append((CURVE_P256, secret, case["publicDidKey"]))
    return out


@pytest.mark.parametrize(("curve", "secret", "did_key"), w3c_cases())
def test_w3c_did_key_fixtures(curve: str, secret: int, did_key: str) -> None:
    ec_curve = ec.SECP256K1() if curve == CURVE_K256 else ec.SECP256R1()
    public = ec.derive_private_key(secret, ec_curve).public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    key = parse_did_key(did_key)
    assert (key.curve, key.point) == (curve, point)
    assert load_key(curve, point).did_key == did_key


def scenario_commits() -> list[tuple[str, str, bytes, str, str | None]]:
    """(scenario, frame type, commit block, publicKeyMultibase, key type) of every commit."""
    out = []
    for path in sorted(SCENARIOS.glob("*.json")):
        scenario = json.loads(path.read_text())
        keys = {
            a["identity"]["did"]: a["identity"]["keys"]["atproto"] for a in scenario["accounts"]
        }
        for message in scenario["messages"]:
            kind, body = message["frame"]["header"]["t"], message["frame"]["body"]
            if kind not in ("#commit", "#sync"):
                continue
            car = read_car(b64decode_loose(body["blocks"]["$bytes"]))
            cid = cid_bytes(body["commit"]["$link"]) if kind == "#commit" else car.root_cid
            key = keys[body.get("repo") or body["did"]]
            out.append((path.stem, kind, car.blocks[cid], key["publicKeyMultibase"], key["type"]))
    return out


def test_scenarios_hold_25_commits_and_1_sync() -> None:
    kinds = [kind for _, kind, *_ in scenario_commits()]
    assert (kinds.count("#commit"), kinds.count("#sync")) == (25, 1)


@pytest.mark.parametrize(
    ("scenario", "kind", "block", "multibase", "key_type"),
    scenario_commits(),
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_every_relay_scenario_commit_verifies(
    scenario: str, kind: str, block: bytes, multibase: str, key_type: str
) -> None:
    key = parse_multikey(multibase, key_type)
    assert verify_commit(key, block)
    unsigned, sig = split_signed_commit(block)
    # Flipping one bit of the signature, or of a signed value, breaks it.
    sig_at = block.index(sig)
    assert not verify_commit(key, flip(block, sig_at + 40))
    did_at = block.index(b"did:plc:") + 10  # inside the signed did text: still valid CBOR
    tampered = flip(block, did_at)
    assert split_signed_commit(tampered)[1] == sig
    assert not verify_commit(key, tampered)
    # The signed bytes are the commit without sig: 1 field fewer, same order.
    assert unsigned[0] == block[0] - 1 and b"sig" not in unsigned


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def car_commit(name: str) -> bytes:
    car = read_car((TESTDATA / name).read_bytes())
    return car.blocks[car.root_cid]


def doc_key(doc_name: str) -> Any:
    doc = json.loads((TESTDATA / doc_name).read_text())
    identity = parse_did_document(doc["id"], doc)
    assert identity.signing_key is not None
    return parse_multikey(identity.signing_key, identity.signing_key_type)


def test_real_repo_with_legacy_uncompressed_k256_key_verifies() -> None:
    key = doc_key("greenground.didDoc.json")
    assert (key.curve, len(key.point)) == (CURVE_K256, 65)  # legacy: uncompressed, no codec
    assert verify_commit(key, car_commit("greenground.repo.93b159a.car"))
    assert verify_commit(doc_key("paul_staging.didDoc.json"), car_commit("paul_staging.repo.car"))
    assert not verify_commit(key, car_commit("paul_staging.repo.car"))  # someone else's key


def test_real_repo_with_high_s_p256_signature_fails_strict() -> None:
    key = doc_key("fakermaker.didDoc.json")
    assert key.curve == CURVE_P256
    block = car_commit("fakermaker.repo.car")
    assert not verify_commit(key, block)
    unsigned, sig = split_signed_commit(block)
    s = int.from_bytes(sig[32:], "big")
    assert s > _ORDER[CURVE_P256] // 2  # high-S, and only that: lenient verification passes
    assert verify_signature(key, unsigned, sig[:32] + (_ORDER[CURVE_P256] - s).to_bytes(32, "big"))


@pytest.mark.parametrize(
    ("multibase", "key_type"),
    [
        ("", None),
        ("Qabc", None),  # not base58btc multibase
        ("z0OIl", None),  # characters outside the base58 alphabet
        ("z" + "2" * 200, None),  # too long to decode
        ("zxdM8dSstjrpZaRUwBmDvjGXweKuEMVN95A9oJBFjkWMh", None),  # bare point without a type
        ("zxdM8dSstjrpZaRUwBmDvjGXweKuEMVN95A9oJBFjkWMh", "Ed25519VerificationKey2020"),
        ("z" + base58btc_encode(b"\xed\x01" + bytes(32)), None),  # ed25519-pub codec
        ("z" + base58btc_encode(b"\xe7\x01\x02" + bytes(32)), None),  # x = 0: not on K-256
        ("z" + base58btc_encode(b"\x80\x24\x02" + b"\xff" * 32), None),  # x >= p on P-256
        ("z" + base58btc_encode(b"\xe7\x01" + bytes(20)), None),  # wrong length
    ],
)
def test_bad_keys_are_key_format_errors(multibase: str, key_type: str | None) -> None:
    with pytest.raises(KeyFormatError):
        parse_multikey(multibase, key_type)


def test_did_key_prefix_required() -> None:
    with pytest.raises(KeyFormatError):
        parse_did_key("did:web:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc")


@settings(max_examples=30, deadline=None)
@given(message=st.binary(max_size=300), index=st.integers(0, 1_000_000))
def test_devnet_signatures_verify_here(message: bytes, index: int) -> None:
    """Cross-implementation: the devnet's signer against this verifier, both curves."""
    signer = SigningKey.from_seed(7, index % 2)
    key = parse_did_key(signer.did_key)
    signature = signer.sign(message)
    assert verify_signature(key, message, signature)
    assert not verify_signature(key, message + b"x", signature)
    assert not verify_signature(key, message, flip(signature, index % 64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_split_signed_commit_is_a_value_or_a_typed_error(data: bytes) -> None:
    try:
        unsigned, sig = split_signed_commit(data)
    except CommitFormatError:
        return
    assert len(unsigned) < len(data) and sig in data


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 300), junk=st.binary(max_size=8))
def test_mutated_real_commit_never_raises(cut: int, junk: bytes) -> None:
    block = scenario_commits()[0][2]
    key = parse_multikey(scenario_commits()[0][3], None)
    mutated = block[:cut] + junk + block[cut + len(junk) :]
    assert verify_commit(key, mutated) is (mutated == block)


def test_nesting_and_huge_lengths_are_bounded() -> None:
    deep = b"\xa1\x63sig" + b"\x81" * 100_000 + b"\x00"
    with pytest.raises(CommitFormatError):
        split_signed_commit(deep)  # sig is not a byte string (and no recursion happened)
    with pytest.raises(CommitFormatError):
        split_signed_commit(b"\xa1\x63sig\x5b" + b"\xff" * 8)  # 2^64-byte string, 0 present
    with pytest.raises(CommitFormatError):
        split_signed_commit(b"\xa1\x63abc\x9b" + b"\xff" * 8)  # 2^64-item array


def test_legacy_did_document_key_type_is_kept() -> None:
    doc = json.loads(
        (FIXTURES / "indigo/atproto/identity/testdata/did_plc_doc_legacy.json").read_text()
    )
    legacy = parse_did_document(doc["id"], doc)
    assert legacy.signing_key_type == "EcdsaSecp256k1VerificationKey2019"
    current = json.loads(
        (FIXTURES / "indigo/atproto/identity/testdata/did_plc_doc.json").read_text()
    )
    identity = parse_did_document(current["id"], current)
    assert identity.signing_key_type == "Multikey"
    assert parse_multikey(identity.signing_key or "", identity.signing_key_type).curve == CURVE_K256
