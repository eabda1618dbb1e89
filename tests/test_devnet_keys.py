"""Devnet keys, signatures and did:plc identities against the interop fixtures."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import libipld
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from firehose.devnet import dagcbor
from firehose.devnet.keys import (
    _ORDER,
    CURVE_K256,
    CURVE_P256,
    SigningKey,
    base58btc_decode,
    base58btc_encode,
    parse_did_key,
    verify,
)
from firehose.devnet.plc import did_document, genesis_operation

CRYPTO = Path("/work/shared/atproto-vectors/interop-tests/crypto")
needs_vectors = pytest.mark.skipif(not CRYPTO.exists(), reason="atproto-vectors not present")


def _fixture_keys() -> list[tuple[str, bytes, str]]:
    out = []
    for name, curve in (("P256", CURVE_P256), ("K256", CURVE_K256)):
        for case in json.loads((CRYPTO / f"w3c_didkey_{name}.json").read_text()):
            if "privateKeyBytesHex" in case:
                private = bytes.fromhex(case["privateKeyBytesHex"])
            else:
                private = base58btc_decode(case["privateKeyBytesBase58"])
            out.append((curve, private, case["publicDidKey"]))
    return out


def test_base58_round_trip_with_leading_zeros() -> None:
    for data in (b"", b"\x00", b"\x00\x00\x01\x02", bytes(range(40))):
        assert base58btc_decode(base58btc_encode(data)) == data
    assert base58btc_encode(b"hello world") == "StV1DL6CwTryKyV"


@needs_vectors
def test_did_key_matches_w3c_fixtures_and_signatures_verify() -> None:
    cases = _fixture_keys()
    assert len(cases) >= 6
    for curve, private, expected_did in cases:
        key = SigningKey(curve, int.from_bytes(private, "big"))
        assert key.did_key == expected_did
        parsed_curve, public = parse_did_key(expected_did)
        assert parsed_curve == curve
        for i in range(20):
            message = f"message {i}".encode()
            signature = key.sign(message)
            assert verify(public, message, signature)
            assert not verify(public, message + b"!", signature)


@needs_vectors
def test_strict_verify_agrees_with_signature_fixtures() -> None:
    cases = json.loads((CRYPTO / "signature-fixtures.json").read_text())
    checked = 0
    for case in cases:
        if "did:key" not in case["publicKeyDid"] or case["tags"]:
            continue  # tagged cases are about DER encoding etc., not low-S on raw r||s
        message = base64.b64decode(case["messageBase64"] + "==")
        signature = base64.b64decode(case["signatureBase64"] + "==")
        _, public = parse_did_key(case["publicKeyDid"])
        assert verify(public, message, signature) == case["validSignature"], case["comment"]
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("index", range(6))
def test_seeded_keys_alternate_curves_and_sign_low_s(index: int) -> None:
    key = SigningKey.from_seed(42, index)
    assert key.curve == (CURVE_P256 if index % 2 == 0 else CURVE_K256)
    assert key.did_key.startswith("did:key:zDnae" if index % 2 == 0 else "did:key:zQ3s")
    assert SigningKey.from_seed(42, index).did_key == key.did_key  # deterministic
    curve = ec.SECP256R1() if key.curve == CURVE_P256 else ec.SECP256K1()
    public = key.public_key()
    order = _ORDER[key.curve]
    rs = set()
    for i in range(50):  # crosses several nonce batches
        message = f"commit {i}".encode()
        signature = key.sign(message)
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert s <= order // 2
        rs.add(r)
        # cryptography checks the plain ECDSA maths (it accepts high-S too)
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        public.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        assert verify(public, message, signature)
        # and our signatures are exactly one of the two valid forms
        high = encode_dss_signature(r, order - s)
        public.verify(high, message, ec.ECDSA(hashes.SHA256()))
        assert decode_dss_signature(high)[1] > order // 2
    assert len(rs) == 50  # a fresh nonce per signature
    assert isinstance(public.curve, type(curve))


def test_plc_genesis_operation_and_did_document() -> None:
    key = SigningKey.from_seed(1, 3)
    identity = genesis_operation(key, "alice.devnet.test", "http://127.0.0.1:2583")
    op = identity.genesis_op
    assert identity.did.startswith("did:plc:") and len(identity.did) == len("did:plc:") + 24
    # the DID is the truncated base32 sha256 of the signed op (decoded/re-encoded by libipld)
    signed_bytes = libipld.encode_dag_cbor(op)
    assert signed_bytes == dagcbor.encode(op)
    digest = base64.b32encode(hashlib.sha256(signed_bytes).digest()).decode().lower()
    assert identity.did == "did:plc:" + digest[:24]
    unsigned = {k: v for k, v in op.items() if k != "sig"}
    signature = base64.urlsafe_b64decode(op["sig"] + "==")
    _, public = parse_did_key(op["rotationKeys"][0])
    assert verify(public, libipld.encode_dag_cbor(unsigned), signature)
    assert op["type"] == "plc_operation" and op["prev"] is None
    assert op["services"]["atproto_pds"]["type"] == "AtprotoPersonalDataServer"

    doc = did_document(identity.did, "alice.devnet.test", key, "http://127.0.0.1:2583")
    assert doc["id"] == identity.did
    assert doc["alsoKnownAs"] == ["at://alice.devnet.test"]
    (method,) = doc["verificationMethod"]
    assert method["type"] == "Multikey" and method["id"] == identity.did + "#atproto"
    assert "did:key:" + method["publicKeyMultibase"] == key.did_key
    (service,) = doc["service"]
    assert service["id"] == "#atproto_pds"
    assert service["serviceEndpoint"] == "http://127.0.0.1:2583"
