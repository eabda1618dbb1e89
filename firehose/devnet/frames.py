"""subscribeRepos frames: a DAG-CBOR header followed by a DAG-CBOR body, concatenated.

Event stream spec (https://atproto.com/specs/event-stream): header ``{"op": 1, "t": "#kind"}``
for messages, ``{"op": -1}`` for errors (body ``{"error", "message"}``). Bodies follow the
com.atproto.sync.subscribeRepos lexicon.
"""

from __future__ import annotations

import time
from typing import Any

from firehose.devnet import dagcbor
from firehose.devnet.repo import Commit

OP_MESSAGE = 1
OP_ERROR = -1


_second_cache: list[tuple[int, str]] = [(-1, "")]


def rfc3339_millis(micros: int) -> str:
    """``2025-01-01T00:00:00.000Z``: the datetime format atproto recommends (UTC, ms, Z)."""
    seconds, rest = divmod(micros, 1_000_000)
    cached_seconds, prefix = _second_cache[0]
    if cached_seconds != seconds:  # consecutive events mostly share their second
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_cache[0] = (seconds, prefix)
    return f"{prefix}.{rest // 1000:03d}Z"


_HEADERS: dict[str, bytes] = {}


def header(kind: str) -> bytes:
    cached = _HEADERS.get(kind)
    if cached is None:
        cached = _HEADERS[kind] = dagcbor.encode({"op": OP_MESSAGE, "t": kind})
    return cached


def message(kind: str, body: dict[str, Any]) -> bytes:
    return header(kind) + dagcbor.encode(body)


def error(name: str, text: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": name}
    if text is not None:
        body["message"] = text
    return dagcbor.encode({"op": OP_ERROR}) + dagcbor.encode(body)


def commit_body(seq: int, commit: Commit, time_str: str) -> dict[str, Any]:
    """The #commit body with keys already in DAG-CBOR order (length first, then bytewise)."""
    ops = []
    for op in commit.ops:
        entry: dict[str, Any] = {"cid": None if op.cid is None else dagcbor.link(op.cid)}
        entry["path"] = op.path
        if op.prev is not None:  # sync 1.1: previous record CID on update/delete only
            entry["prev"] = dagcbor.link(op.prev)
        entry["action"] = op.action
        ops.append(entry)
    body: dict[str, Any] = {
        "ops": ops,
        "rev": commit.rev,
        "seq": seq,
        "repo": commit.did,
        "time": time_str,
        "blobs": [],  # deprecated in the lexicon; relays send an empty array
        "since": commit.since,
        "blocks": commit.car,
        "commit": dagcbor.link(commit.commit_cid),
        "rebase": False,
        "tooBig": False,
    }
    if commit.prev_data is not None:  # absent on an account's first commit
        body["prevData"] = dagcbor.link(commit.prev_data)
    return body


def commit(seq: int, commit: Commit, time_str: str) -> bytes:
    return header("#commit") + dagcbor.encode_ordered(commit_body(seq, commit, time_str))


def identity(seq: int, did: str, time_str: str, handle: str | None) -> bytes:
    body: dict[str, Any] = {"seq": seq, "did": did, "time": time_str}
    if handle is not None:
        body["handle"] = handle
    return message("#identity", body)


def account(seq: int, did: str, time_str: str, status: str | None) -> bytes:
    """`status` None means active (the lexicon omits `status` when `active` is true)."""
    body: dict[str, Any] = {"seq": seq, "did": did, "time": time_str, "active": status is None}
    if status is not None:
        body["status"] = status
    return message("#account", body)


def info(name: str, text: str | None = None) -> bytes:
    body: dict[str, Any] = {"name": name}
    if text is not None:
        body["message"] = text
    return message("#info", body)
