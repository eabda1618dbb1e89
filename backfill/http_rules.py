"""PURE rules of the backfill's HTTP: failure classes, rate-limit headers, address checks.

`FetchError.reason` is a metric label, so it comes from the fixed set `FETCH_REASONS`.
Rate-limit headers follow the IETF draft
(https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/) as the reference
PDS sends them (``RateLimit-Reset`` in epoch seconds), and ``Retry-After`` follows RFC 9110
s10.2.3 (delta-seconds or an HTTP-date). `hosts.HostClient` applies them.
"""

from __future__ import annotations

import email.utils
import ipaddress
from urllib.parse import urlsplit

RATE_LIMIT_DEFAULT_PAUSE_S = 60.0  # a 429 that says nothing about when to come back
RATE_LIMIT_MAX_PAUSE_S = 3600.0  # the longest window the reference PDS uses is an hour
RATE_LIMIT_LOW_REMAINING = 10  # below this budget, space requests until the reset
# RateLimit-Reset values below this are delta-seconds (the draft), above it epoch seconds
# (what the reference PDS sends): 10^9 s is 2001-09-09, 31 years of delta.
RATE_LIMIT_EPOCH_THRESHOLD_S = 1_000_000_000

# Every value FetchError.reason may take (a metric label): keep the set small and fixed.
FETCH_REASONS = frozenset(
    {
        "bad_url",  # not http(s), no host
        "forbidden_address",  # private/loopback/link-local and allow_private is off
        "connection",  # connect/reset/DNS failure
        "tls",  # the TLS handshake failed: certificate not valid for the host, untrusted
        "timeout",
        "truncated",  # the body ended early
        "too_large",  # body over the cap
        "bad_response",  # not JSON, wrong shape, unexpected redirect
        "rate_limited",  # 429
        "server_error",  # 5xx (and 408)
        "not_found",  # 404 / 410
        "repo_not_found",
        "repo_deactivated",
        "repo_takendown",
        "repo_suspended",
        "record_not_found",  # com.atproto.sync.getRecord: the record does not exist
        "client_error",  # any other 4xx
    }
)

# XRPC error names of com.atproto.sync.getRepo / getLatestCommit / getRecord (lexicon
# `errors`).
XRPC_ERRORS = {
    "RepoNotFound": "repo_not_found",
    "RepoDeactivated": "repo_deactivated",
    "RepoTakendown": "repo_takendown",
    "RepoSuspended": "repo_suspended",
    "RecordNotFound": "record_not_found",
}


class ReasonedError(Exception):
    """A failure with a `reason` from the bounded set `REASONS` (a metric label; any other
    becomes `FALLBACK`, the unknown name kept in the detail), a one-line detail of at most 200
    characters (it ends up in logs and error columns), and whether retrying later may
    succeed (`transient`, `retry_after_s`)."""

    REASONS: frozenset[str] = frozenset()
    FALLBACK = ""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        transient: bool,
        retry_after_s: float | None = None,
    ) -> None:
        if reason not in self.REASONS:
            detail, reason = f"({reason[:20]}) {detail}", self.FALLBACK
        detail = detail.replace("\n", " ")[:200]
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after_s = retry_after_s


class FetchError(ReasonedError):
    """An HTTP fetch failed; `status` is the HTTP status when there was an answer."""

    REASONS = FETCH_REASONS
    FALLBACK = "bad_response"

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        transient: bool,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(reason, detail, transient=transient, retry_after_s=retry_after_s)
        self.status = status


def host_key(url: str) -> str:
    """``scheme://host:port`` -> ``host:port`` (the unit of politeness)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return f"{host}:{port}"


# IPv6 forms that carry an IPv4 address and reach it: judged by that IPv4 address, or
# "64:ff9b::10.0.0.1" (NAT64) and "::127.0.0.1" (IPv4-compatible), which Python calls
# global, would let a DID document aim at a private IPv4 service through them.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291 s2.5.5.1 (deprecated)
# Never global, though Python 3.11 says so: site-local (RFC 3879, deprecated) and the NAT64
# local-use prefix (RFC 8215).
_NOT_GLOBAL_V6 = (ipaddress.ip_network("fec0::/10"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or (addr in _IPV4_COMPATIBLE and int(addr) > 1):  # not :: or ::1
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_forbidden_ip(text: str) -> bool:
    """True for any address that is not globally routable (or is multicast): loopback,
    RFC 1918, CGNAT 100.64/10, link-local 169.254/16 and fe80::/10, fc00::/7, 0.0.0.0, ::,
    reserved and documentation ranges, and IPv6 forms embedding one of those."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _NOT_GLOBAL_V6):
            return True
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return not embedded.is_global or embedded.is_multicast
    return not addr.is_global or addr.is_multicast


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP-date (RFC 9110 s10.2.3) -> seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_epoch)


def parse_reset(value: str | None, now_epoch: float) -> float | None:
    """``RateLimit-Reset`` -> seconds from now (epoch seconds or, when small, a delta)."""
    if not value:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if number != number or number < 0:  # NaN or negative
        return None
    if number >= RATE_LIMIT_EPOCH_THRESHOLD_S:
        return max(0.0, number - now_epoch)
    return number


def parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 19 else None
