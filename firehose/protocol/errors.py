"""The one exception the protocol decoder raises, and its bounded set of reasons.

`ProtocolError.reason` is used as a Prometheus label (``firehose_invalid_total{reason=...}``),
so it must come from a small fixed set; `detail` goes into a log line, so it is truncated.
"""

from __future__ import annotations

# Every value `ProtocolError.reason` may take. Keep in sync with docs/ARCHITECTURE.md.
REASONS: frozenset[str] = frozenset(
    {
        "cbor",  # not valid (strict) DAG-CBOR, or nesting too deep
        "header",  # frame header missing/invalid (op, t)
        "body",  # frame body or commit/MST object lacks a field or has a wrong type
        "car",  # CAR framing: header, varints, truncated sections, bad CID bytes
        "block_hash",  # a block's sha256 does not match its CID
        "missing_block",  # a CID referenced by a commit, op or MST node is not in the CAR
        "too_large",  # a size or count limit was exceeded
        "bad_op",  # a repo op is inconsistent (unknown action, cid on delete, ...)
        "syntax",  # an identifier (NSID, record key, DID, TID) has invalid syntax
        "unsupported",  # well-formed but a version/codec/hash we do not handle
    }
)

MAX_DETAIL_CHARS = 200


class ProtocolError(Exception):
    """Malformed or unsupported input. The only exception the public decoders raise."""

    reason: str
    detail: str

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            # A programming error, but never let it widen the metric label set.
            detail = f"(unknown reason {reason[:20]!r}) {detail}"
            reason = "body"
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across processes
        return (type(self), (self.reason, self.detail))


class CborError(ProtocolError):
    """Invalid DAG-CBOR (reason ``cbor``)."""

    def __init__(self, detail: str = "", reason: str = "cbor") -> None:
        super().__init__(reason, detail)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.detail, self.reason))


class CarError(ProtocolError):
    """Invalid CAR file (reason ``car``, ``block_hash``, ``too_large`` or ``unsupported``)."""

    def __init__(self, detail: str = "", reason: str = "car") -> None:
        super().__init__(reason, detail)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.detail, self.reason))


class FrameError(ProtocolError):
    """Invalid subscribeRepos frame (reason ``header``, ``body``, ``too_large``...)."""

    def __init__(self, detail: str = "", reason: str = "body") -> None:
        super().__init__(reason, detail)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.detail, self.reason))


def describe(exc: BaseException) -> str:
    """A short, single-line description of a foreign exception for `detail`."""
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text}"[:MAX_DETAIL_CHARS]
