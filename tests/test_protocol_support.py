"""Helpers shared by the protocol tests (no tests here): fixture paths and an independent
DAG-CBOR encoder (cbor2) for turning DAG-JSON vectors into binary frames."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cbor2

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "atproto-vectors"


def cid_bytes(text: str) -> bytes:
    """Independent base32 decode of a 'b...' CID string (no multibase prefix)."""
    body = text[1:].upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def b64decode_loose(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def from_json_form(obj: Any) -> Any:
    """atproto JSON form / DAG-JSON ({"$link"}, {"$bytes"}, {"/": cid}) -> cbor2 values."""
    if isinstance(obj, dict):
        if set(obj) == {"$link"}:
            return cbor2.CBORTag(42, b"\x00" + cid_bytes(obj["$link"]))
        if set(obj) == {"/"} and isinstance(obj["/"], str):
            return cbor2.CBORTag(42, b"\x00" + cid_bytes(obj["/"]))
        if set(obj) == {"/"} and isinstance(obj["/"], dict):
            return b64decode_loose(obj["/"]["bytes"])
        if set(obj) == {"$bytes"}:
            return b64decode_loose(obj["$bytes"])
        return {k: from_json_form(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_form(v) for v in obj]
    return obj


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: (len(k.encode()), k.encode()))
        return {k: _sorted(obj[k]) for k in keys}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    if isinstance(obj, cbor2.CBORTag):
        return obj
    return obj


def dag_cbor(obj: Any) -> bytes:
    """DAG-CBOR with cbor2: map keys sorted length-first then bytewise, floats as float64.

    Not `canonical=True`: that would shorten floats, which DAG-CBOR forbids.
    """
    return cbor2.dumps(_sorted(obj))


def frame(header: dict[str, Any], body: Any) -> bytes:
    return dag_cbor(from_json_form(header)) + dag_cbor(from_json_form(body))


def relay_messages() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((FIXTURES / "indigo/cmd/relay/testing/testdata").glob("*.json")):
        for message in json.loads(path.read_text())["messages"]:
            out.append((path.stem, message))
    return out


def relay_frames() -> list[bytes]:
    return [frame(m["frame"]["header"], m["frame"]["body"]) for _, m in relay_messages()]


def commit_bodies() -> list[tuple[str, dict[str, Any]]]:
    folder = FIXTURES / "indigo/atproto/repo/testdata"
    return [(p.stem, json.loads(p.read_text())) for p in sorted(folder.glob("firehose_commit_*"))]


REPO_CARS = {
    # path below fixtures/ -> (repo version, record count) from the vectors README
    "indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car": (3, 38),
    "indigo/testing/testdata/greenground.repo.car": (3, 2),
    "indigo/testing/testdata/greenground.repo.93b159a.car": (2, 50),
    "indigo/testing/testdata/paul_staging.repo.car": (2, 185),
    "indigo/testing/testdata/fakermaker.repo.car": (2, 142),
    "indigo/testing/testdata/divy.repo": (2, 6),
    "indigo/testing/testdata/bafyreieovfuizojpw3zresz7sx3nk4trm2by23pt5rxbey3jme4uo5ogiu.car": (
        2,
        6,
    ),
    "rsky/rsky-repo/resources/test/valid_repo.car": (3, 6),
    "arroba/arroba/tests/snarfed2.car": (3, 5),
}
PARTIAL_CAR = "indigo/testing/testdata/repo_slice.car"
