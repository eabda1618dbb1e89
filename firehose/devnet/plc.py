"""did:plc identities: a signed genesis operation and the DID document it describes.

did:plc spec (https://web.plc.directory/spec/v0.1/did-plc): the DID is
``"did:plc:" + base32-lower(sha256(dag-cbor(signed genesis op)))[:24]``. The op is signed by
one of its own rotation keys over the DAG-CBOR of the op without `sig`; `sig` is the raw
64-byte low-S signature in base64url without padding. We use the account's signing key as its
only rotation key, which keeps the devnet self-contained (a real PDS would keep them apart).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from firehose.devnet import dagcbor
from firehose.devnet.keys import SigningKey

PLC_DID_HASH_CHARS = 24
PDS_SERVICE_ID = "atproto_pds"
PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"


@dataclass(frozen=True)
class PlcIdentity:
    did: str
    genesis_op: dict[str, Any]  # the signed operation, in its JSON form


def genesis_operation(key: SigningKey, handle: str, pds_endpoint: str) -> PlcIdentity:
    unsigned: dict[str, Any] = {
        "type": "plc_operation",
        "rotationKeys": [key.did_key],
        "verificationMethods": {"atproto": key.did_key},
        "alsoKnownAs": [f"at://{handle}"],
        "services": {PDS_SERVICE_ID: {"type": PDS_SERVICE_TYPE, "endpoint": pds_endpoint}},
        "prev": None,
    }
    signature = key.sign(dagcbor.encode(unsigned))
    signed = {**unsigned, "sig": base64.urlsafe_b64encode(signature).decode().rstrip("=")}
    digest = hashlib.sha256(dagcbor.encode(signed)).digest()
    suffix = base64.b32encode(digest).decode().lower()[:PLC_DID_HASH_CHARS]
    return PlcIdentity(did=f"did:plc:{suffix}", genesis_op=signed)


def did_document(did: str, handle: str, key: SigningKey, pds_endpoint: str) -> dict[str, Any]:
    """The DID document a PLC directory serves for this identity (current handle)."""
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": key.multikey,
            }
        ],
        "service": [
            {
                "id": f"#{PDS_SERVICE_ID}",
                "type": PDS_SERVICE_TYPE,
                "serviceEndpoint": pds_endpoint,
            }
        ],
    }
