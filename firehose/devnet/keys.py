"""Account signing keys: P-256 and K-256, did:key encoding, low-S ECDSA signatures.

atproto (https://atproto.com/specs/cryptography) allows two curves, NIST P-256 ("ES256") and
secp256k1 ("ES256K"). Signatures are ECDSA over the SHA-256 of the message, serialised as
the raw 64-byte ``r || s`` (not DER), and must be "low-S": ``s <= n/2``, because both
(r, s) and (r, n - s) verify and atproto forbids that malleability.

Public keys are written as did:key / Multikey: multicodec varint (p256-pub 0x1200,
secp256k1-pub 0xe7) + the 33-byte compressed point, base58btc with the multibase prefix 'z'.

Nonces: devnet keys are public by construction (anyone holding the seed can derive them), so
nonce secrecy protects nothing. We therefore pick nonces in an arithmetic progression
``k_i = k_0 + i * step`` so that ``R_i = R_(i-1) + step*G`` costs one point addition instead
of a full scalar multiplication: OpenSSL has no fast secp256k1 code (≈ 700 µs a signature)
and the generator signs tens of thousands of commits. The signatures are ordinary valid
ECDSA and verify with any implementation. Never reuse this module for keys that matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

CURVE_P256 = "p256"
CURVE_K256 = "k256"

# Multicodec varints of the public-key codecs (https://github.com/multiformats/multicodec).
MULTICODEC_P256_PUB = b"\x80\x24"  # 0x1200
MULTICODEC_K256_PUB = b"\xe7\x01"  # 0xe7

# Field prime p and group order n of each curve (SEC 2 / FIPS 186-4).
_FIELD_PRIME = {
    CURVE_P256: 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF,
    CURVE_K256: 2**256 - 2**32 - 977,
}
_ORDER = {
    CURVE_P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    CURVE_K256: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
}
_CRYPTOGRAPHY_CURVE: dict[str, ec.EllipticCurve] = {
    CURVE_P256: ec.SECP256R1(),
    CURVE_K256: ec.SECP256K1(),
}
_MULTICODEC = {CURVE_P256: MULTICODEC_P256_PUB, CURVE_K256: MULTICODEC_K256_PUB}

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58btc_encode(data: bytes) -> str:
    """Bitcoin base58 (no checksum); each leading zero byte becomes a '1'."""
    n = int.from_bytes(data, "big")
    chars = []
    while n:
        n, rem = divmod(n, 58)
        chars.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(chars))


def base58btc_decode(text: str) -> bytes:
    n = 0
    for char in text:
        n = n * 58 + _B58_ALPHABET.index(char)
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def multikey(curve: str, compressed_point: bytes) -> str:
    """publicKeyMultibase of a Multikey: 'z' + base58btc(multicodec prefix + point)."""
    return "z" + base58btc_encode(_MULTICODEC[curve] + compressed_point)


def did_key(curve: str, compressed_point: bytes) -> str:
    return "did:key:" + multikey(curve, compressed_point)


def parse_did_key(did: str) -> tuple[str, ec.EllipticCurvePublicKey]:
    """did:key (or bare multibase) -> (curve, public key). Used by tests and fixtures."""
    text = did.removeprefix("did:key:")
    if not text.startswith("z"):
        raise ValueError(f"not base58btc multibase: {did!r}")
    raw = base58btc_decode(text[1:])
    for curve, prefix in _MULTICODEC.items():
        if raw.startswith(prefix):
            point = raw[len(prefix) :]
            key = ec.EllipticCurvePublicKey.from_encoded_point(_CRYPTOGRAPHY_CURVE[curve], point)
            return curve, key
    raise ValueError(f"unknown multicodec in {did!r}")


def _compressed(curve: str, x: int, y: int) -> bytes:
    return bytes([2 + (y & 1)]) + x.to_bytes(32, "big")


def _base_mul(curve: str, scalar: int) -> tuple[int, int]:
    """scalar * G, computed by OpenSSL (once per key, so its speed does not matter)."""
    numbers = (
        ec.derive_private_key(scalar, _CRYPTOGRAPHY_CURVE[curve]).public_key().public_numbers()
    )
    return numbers.x, numbers.y


def _hash_scalar(label: bytes, order: int) -> int:
    """A scalar in [1, n-1] from a label (never 0, which is not a valid key or nonce)."""
    return int.from_bytes(hashlib.sha256(label).digest(), "big") % (order - 1) + 1


@dataclass
class SigningKey:
    """One account's signing key; `sign` is deterministic given the sequence of calls."""

    curve: str
    private_value: int
    public_point: bytes = field(init=False)
    _r_x: int = field(init=False, repr=False)
    _r_y: int = field(init=False, repr=False)
    _k: int = field(init=False, repr=False)
    _step_x: int = field(init=False, repr=False)
    _step_y: int = field(init=False, repr=False)
    _step: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        order = _ORDER[self.curve]
        x, y = _base_mul(self.curve, self.private_value)
        self.public_point = _compressed(self.curve, x, y)
        secret = self.private_value.to_bytes(32, "big")
        self._k = _hash_scalar(b"devnet-nonce-start|" + secret, order)
        self._step = _hash_scalar(b"devnet-nonce-step|" + secret, order)
        self._r_x, self._r_y = _base_mul(self.curve, self._k)
        self._step_x, self._step_y = _base_mul(self.curve, self._step)

    @classmethod
    def from_seed(cls, seed: int, index: int) -> SigningKey:
        """Account `index`'s key: even indexes P-256, odd K-256 (both curves get exercised)."""
        curve = CURVE_P256 if index % 2 == 0 else CURVE_K256
        label = f"devnet-account-key|{seed}|{index}".encode()
        return cls(curve, _hash_scalar(label, _ORDER[curve]))

    @property
    def did_key(self) -> str:
        return did_key(self.curve, self.public_point)

    @property
    def multikey(self) -> str:
        return multikey(self.curve, self.public_point)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(
            _CRYPTOGRAPHY_CURVE[self.curve], self.public_point
        )

    def sign(self, message: bytes) -> bytes:
        """ECDSA-SHA256 of `message` as raw 64-byte r||s, low-S normalised."""
        order = _ORDER[self.curve]
        z = int.from_bytes(hashlib.sha256(message).digest(), "big")
        k, r = self._k, self._r_x % order
        self._advance_nonce()
        s = pow(k, -1, order) * (z + r * self.private_value) % order
        if r == 0 or s == 0:  # probability ~2^-256; move on to the next nonce
            return self.sign(message)
        if s > order // 2:
            s = order - s  # atproto requires low-S (cryptography spec, "ECDSA signatures")
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def _advance_nonce(self) -> None:
        """k += step and R += step*G: one affine point addition (distinct x with overwhelming
        probability; the doubling and inverse cases are handled for completeness)."""
        prime = _FIELD_PRIME[self.curve]
        x1, y1, x2, y2 = self._r_x, self._r_y, self._step_x, self._step_y
        if x1 == x2:  # R == ±step*G: recompute from the scalar instead of special-casing
            self._k = (self._k + self._step) % _ORDER[self.curve] or 1
            self._r_x, self._r_y = _base_mul(self.curve, self._k)
            return
        slope = (y2 - y1) * pow(x2 - x1, -1, prime) % prime
        x3 = (slope * slope - x1 - x2) % prime
        self._r_y = (slope * (x1 - x3) - y1) % prime
        self._r_x = x3
        self._k = (self._k + self._step) % _ORDER[self.curve]


def verify(public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> bool:
    """Strict atproto verification with cryptography: 64-byte r||s, low-S, ECDSA-SHA256."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(signature) != 64:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    order = _ORDER[CURVE_P256 if isinstance(public_key.curve, ec.SECP256R1) else CURVE_K256]
    if s > order // 2:
        return False
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
