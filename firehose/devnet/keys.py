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

from firehose.protocol.signature import base58btc_decode, base58btc_encode

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


def _batch_inverse(values: list[int], modulus: int) -> list[int]:
    """Montgomery's trick: n modular inverses for one `pow(..., -1)` and 3n multiplications."""
    prefix = [1] * (len(values) + 1)
    for i, value in enumerate(values):
        prefix[i + 1] = prefix[i] * value % modulus
    inverse = pow(prefix[-1], -1, modulus)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inverse % modulus
        inverse = inverse * values[i] % modulus
    return out


NONCE_BATCH = 16  # nonces prepared per refill; each refill costs two modular inversions


@dataclass
class SigningKey:
    """One account's signing key; `sign` is deterministic given the sequence of calls."""

    curve: str
    private_value: int
    public_point: bytes = field(init=False)
    _next_k: int = field(init=False, repr=False)  # nonce of the next point to prepare
    _next_r: tuple[int, int] = field(init=False, repr=False)  # next_k * G, affine
    _step: int = field(init=False, repr=False)
    _step_point: tuple[int, int] = field(init=False, repr=False)  # step * G, affine
    _ready: list[tuple[int, int]] = field(init=False, repr=False)  # (k^-1 mod n, r), reversed

    def __post_init__(self) -> None:
        order = _ORDER[self.curve]
        x, y = _base_mul(self.curve, self.private_value)
        self.public_point = _compressed(self.curve, x, y)
        secret = self.private_value.to_bytes(32, "big")
        self._next_k = _hash_scalar(b"devnet-nonce-start|" + secret, order)
        self._step = _hash_scalar(b"devnet-nonce-step|" + secret, order)
        self._next_r = _base_mul(self.curve, self._next_k)
        self._step_point = _base_mul(self.curve, self._step)
        self._ready = []

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
        while True:
            if not self._ready:
                self._prepare_nonces()
            k_inverse, r = self._ready.pop()
            s = k_inverse * (z + r * self.private_value) % order
            if r != 0 and s != 0:  # else (probability ~2^-256) use the next nonce
                break
        if s > order // 2:
            s = order - s  # atproto requires low-S (cryptography spec, "ECDSA signatures")
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def _prepare_nonces(self) -> None:
        """Walk R += step*G for NONCE_BATCH points in Jacobian coordinates (mixed addition,
        "madd-2007-bl" of the Explicit-Formulas Database, valid for any short Weierstrass
        curve), then normalise all of them and invert all nonces with one inversion each."""
        prime, order = _FIELD_PRIME[self.curve], _ORDER[self.curve]
        step_x, step_y = self._step_point
        x, y = self._next_r
        points = [(x, y, 1)]
        nonces = [self._next_k]
        for _ in range(NONCE_BATCH):
            x1, y1, z1 = points[-1]
            z1z1 = z1 * z1 % prime
            h = (step_x * z1z1 - x1) % prime
            rr = 2 * (step_y * z1 * z1z1 - y1) % prime
            if h == 0:  # R == ±step*G: restart this batch from the scalar (never happens)
                break
            hh = h * h % prime
            i = 4 * hh % prime
            j = h * i % prime
            v = x1 * i % prime
            x3 = (rr * rr - j - 2 * v) % prime
            y3 = (rr * (v - x3) - 2 * y1 * j) % prime
            z3 = ((z1 + h) * (z1 + h) - z1z1 - hh) % prime
            points.append((x3, y3, z3))
            nonces.append((nonces[-1] + self._step) % order)
        z_inverses = _batch_inverse([z for _, _, z in points], prime)
        k_inverses = _batch_inverse(nonces[:-1], order)
        affine = [
            (px * zi * zi % prime, py * zi * zi * zi % prime)
            for (px, py, _), zi in zip(points, z_inverses, strict=True)
        ]
        ready = [(ki, ax % order) for ki, (ax, _) in zip(k_inverses, affine, strict=False)]
        self._ready = ready[::-1]  # pop() from the end yields them in nonce order
        self._next_k, self._next_r = nonces[-1], affine[-1]
        if len(points) <= NONCE_BATCH:  # the degenerate case above: recompute from scratch
            self._next_k = (self._next_k + self._step) % order or 1
            self._next_r = _base_mul(self.curve, self._next_k)


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
