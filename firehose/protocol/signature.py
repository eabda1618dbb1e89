"""Commit signatures: did:key / Multikey parsing and strict atproto ECDSA verification. PURE.

The rules (https://atproto.com/specs/cryptography, https://atproto.com/specs/repository):

* Two curves: NIST P-256 (``ES256``) and secp256k1 (``ES256K``).
* A public key is written as a Multikey: ``z`` (multibase base58btc) + the multicodec
  varint of the key type (p256-pub 0x1200 -> ``80 24``, secp256k1-pub 0xe7 -> ``e7 01``) +
  the 33-byte compressed point; ``did:key:`` + that string is the did:key form. Old DID
  documents (before the PLC directory moved to Multikey) carry the legacy form instead: the
  curve in the verification method's ``type`` (``EcdsaSecp256r1VerificationKey2019`` /
  ``EcdsaSecp256k1VerificationKey2019``) and the bare point, compressed or uncompressed (65
  bytes), base58btc without a multicodec prefix.
* A signature is ECDSA over SHA-256 of the message, serialised as the raw 64 bytes
  ``r || s``. DER is not accepted, and ``s`` must be in the lower half of the group order
  ("low-S"): (r, s) and (r, n - s) both verify, and atproto forbids that malleability.
* A commit is signed over the DAG-CBOR encoding of the commit object without its ``sig``
  field. We cut ``sig`` out of the received block's bytes rather than decode and re-encode:
  the block's hash was already checked against its CID, canonical DAG-CBOR (sorted keys)
  stays canonical when one entry is removed, and re-encoding decoded data with libipld is
  unsafe (it turns any byte string that parses as a CID into a link, DESIGN.md).

Speed (measured on the 2-core CI machine, `bench`-style loop of 2,000 verifies, one
200-byte message): P-256 with `cryptography` (OpenSSL) 290 us; K-256 with `cryptography`
1,265 us (OpenSSL has no optimised secp256k1 code), with `coincurve` (libsecp256k1) 68 us.
Most accounts on the network use K-256 keys, so K-256 goes through coincurve: 19x faster.
Building a key object from its point costs 120 us (P-256, OpenSSL) / 11 us (coincurve), so
callers should keep parsed keys (`PublicKey` is hashable and cheap to keep).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

CURVE_P256 = "p256"
CURVE_K256 = "k256"

MULTICODEC_P256_PUB = b"\x80\x24"  # varint of 0x1200
MULTICODEC_K256_PUB = b"\xe7\x01"  # varint of 0xe7
MULTIKEY_TYPE = "Multikey"
LEGACY_KEY_TYPES = {
    "EcdsaSecp256r1VerificationKey2019": CURVE_P256,
    "EcdsaSecp256k1VerificationKey2019": CURVE_K256,
}
DID_KEY_PREFIX = "did:key:"

SIGNATURE_BYTES = 64
COMPRESSED_POINT_BYTES = 33
UNCOMPRESSED_POINT_BYTES = 65
# A Multikey is ~48 characters, a legacy uncompressed key ~90. base58 decoding is quadratic
# in the length, so a hostile DID document must not hand us megabytes to decode.
MAX_MULTIBASE_CHARS = 128
# A commit object has 5 (v2) or 6 (v3) fields; a few more leave room for additions.
MAX_COMMIT_FIELDS = 16

# Group orders (SEC 2 / FIPS 186-4); low-S means s <= n // 2.
_ORDER = {
    CURVE_P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    CURVE_K256: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_VALUES = {char: value for value, char in enumerate(_B58_ALPHABET)}


class KeyFormatError(ValueError):
    """A public key that is not a supported did:key / Multikey / legacy key."""


class CommitFormatError(ValueError):
    """A commit block whose signed part cannot be located (not a map, no ``sig`` bytes)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A parsed signing key. `point` is the SEC1 encoding it was given in."""

    curve: str
    point: bytes
    _impl: Any = field(compare=False, repr=False)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Strict atproto verification of `signature` over `message` (see module doc)."""
        return verify_signature(self, message, signature)

    @property
    def did_key(self) -> str:
        return DID_KEY_PREFIX + self.multikey

    @property
    def multikey(self) -> str:
        prefix = MULTICODEC_P256_PUB if self.curve == CURVE_P256 else MULTICODEC_K256_PUB
        return "z" + base58btc_encode(prefix + _compress(self))


def base58btc_decode(text: str) -> bytes:
    """Bitcoin base58 (no checksum): each leading '1' is a zero byte."""
    n = 0
    try:
        for char in text:
            n = n * 58 + _B58_VALUES[char]
    except KeyError:
        raise KeyFormatError("not base58btc") from None
    zeros = len(text) - len(text.lstrip("1"))
    return b"\x00" * zeros + (n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b"")


def base58btc_encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    chars = []
    while n:
        n, rem = divmod(n, 58)
        chars.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(chars))


def load_key(curve: str, point: bytes) -> PublicKey:
    """A SEC1 point (33 or 65 bytes) on `curve` -> PublicKey; KeyFormatError if not on it."""
    if len(point) not in (COMPRESSED_POINT_BYTES, UNCOMPRESSED_POINT_BYTES):
        raise KeyFormatError(f"a {len(point)}-byte point")
    impl: Any
    try:
        if curve == CURVE_K256:
            impl = coincurve.PublicKey(point)
        elif curve == CURVE_P256:
            impl = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        else:
            raise KeyFormatError(f"unknown curve {curve[:20]!r}")
    except (ValueError, TypeError) as exc:
        if isinstance(exc, KeyFormatError):
            raise
        raise KeyFormatError(f"not a point on {curve}") from None
    return PublicKey(curve, bytes(point), impl)


def parse_multikey(multibase: str, key_type: str | None = None) -> PublicKey:
    """``publicKeyMultibase`` -> PublicKey.

    A multicodec-prefixed key (Multikey, did:key) names its own curve. A bare point is the
    legacy form and needs the verification method's `key_type` to know the curve."""
    if type(multibase) is not str or not multibase.startswith("z"):
        raise KeyFormatError("not a base58btc multibase string")
    if len(multibase) > MAX_MULTIBASE_CHARS:
        raise KeyFormatError(f"{len(multibase)} characters")
    raw = base58btc_decode(multibase[1:])
    if raw[:2] == MULTICODEC_P256_PUB:
        return load_key(CURVE_P256, raw[2:])
    if raw[:2] == MULTICODEC_K256_PUB:
        return load_key(CURVE_K256, raw[2:])
    curve = LEGACY_KEY_TYPES.get(key_type or "")
    if curve is None:
        raise KeyFormatError(f"no multicodec prefix and key type {str(key_type)[:40]!r}")
    return load_key(curve, raw)


def parse_did_key(did_key: str) -> PublicKey:
    """``did:key:z...`` (P-256 or K-256 Multikey) -> PublicKey."""
    if type(did_key) is not str or not did_key.startswith(DID_KEY_PREFIX):
        raise KeyFormatError("not a did:key")
    key = parse_multikey(did_key[len(DID_KEY_PREFIX) :])
    return key


def verify_signature(key: PublicKey, message: bytes, signature: bytes) -> bool:
    """ECDSA-SHA256 of `message`: raw 64-byte r||s, 0 < r < n, 0 < s <= n/2 (low-S)."""
    if len(signature) != SIGNATURE_BYTES:
        return False  # DER (70-72 bytes) or anything else
    order = _ORDER[key.curve]
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < order and 0 < s <= order // 2):
        return False
    der = encode_dss_signature(r, s)
    if key.curve == CURVE_K256:
        try:
            return bool(key._impl.verify(der, message))  # hashes with SHA-256
        except ValueError:
            return False
    try:
        key._impl.verify(der, message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _compress(key: PublicKey) -> bytes:
    if len(key.point) == COMPRESSED_POINT_BYTES:
        return key.point
    y_odd = key.point[-1] & 1
    return bytes([2 + y_odd]) + key.point[1:33]


# --- the signed part of a commit block ---------------------------------------------------


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """One CBOR head at `pos` -> (major type, argument, position after the head)."""
    if pos >= len(data):
        raise CommitFormatError("truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:  # indefinite lengths and reserved values are not DAG-CBOR
        raise CommitFormatError(f"CBOR additional info {info}")
    size = 1 << (info - 24)
    end = pos + 1 + size
    if end > len(data):
        raise CommitFormatError("truncated")
    return major, int.from_bytes(data[pos + 1 : end], "big"), end


def _skip(data: bytes, pos: int) -> int:
    """Position after the CBOR item at `pos`. Iterative: hostile nesting cannot recurse."""
    remaining = 1
    while remaining:
        remaining -= 1
        major, arg, pos = _head(data, pos)
        if major in (2, 3):  # byte / text string
            pos += arg
        elif major == 4:  # array
            remaining += arg
        elif major == 5:  # map
            remaining += 2 * arg
        elif major == 6:  # tag: one item follows
            remaining += 1
        if pos > len(data) or remaining > len(data):  # every item takes at least a byte
            raise CommitFormatError("truncated")
    return pos


def split_signed_commit(block: bytes) -> tuple[bytes, bytes]:
    """A signed commit block -> (DAG-CBOR of the commit without ``sig``, the ``sig`` bytes).

    Only the entries before ``sig`` are parsed (did and rev, in DAG-CBOR key order); the
    ones after it are kept byte for byte. The worker's decoder has already refused blocks
    with trailing bytes or duplicate keys, and anything odd left after ``sig`` is part of
    the signed bytes, so it cannot verify unless the key's owner signed exactly that."""
    major, count, pos = _head(block, 0)
    if major != 5 or not 0 < count <= MAX_COMMIT_FIELDS:
        raise CommitFormatError("commit is not a map of at most 16 fields")
    first = pos
    for _ in range(count):
        start = pos
        key_major, key_len, key_pos = _head(block, pos)
        if key_major != 3:
            raise CommitFormatError("commit map key is not text")
        value_pos = key_pos + key_len
        if block[key_pos:value_pos] == b"sig":
            value_major, sig_len, sig_pos = _head(block, value_pos)
            end = sig_pos + sig_len
            if value_major != 2 or end > len(block):
                raise CommitFormatError("sig is not a byte string")
            # count - 1 <= 15 fits the one-byte map head (0xa0 | n)
            unsigned = bytes([0xA0 | (count - 1)]) + block[first:start] + block[end:]
            return unsigned, block[sig_pos:end]
        pos = _skip(block, value_pos)
    raise CommitFormatError("commit has no sig")


def verify_commit(key: PublicKey, block: bytes) -> bool:
    """Does the commit block's ``sig`` verify with `key`? Malformed blocks do not."""
    try:
        unsigned, signature = split_signed_commit(block)
    except CommitFormatError:
        return False
    return verify_signature(key, unsigned, signature)
