"""HTTP to relays, PDSes and the PLC directory, polite per host. I/O.

Every host (``host:port``) gets its own concurrency limit and its own rate-limit state.
atproto services announce their limits with the IETF draft headers
(https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/):
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (the reference PDS
sends the reset as epoch seconds; the draft says delta-seconds, so small values are read
as a delta). We slow down *before* a 429: when the remaining budget is low, requests are
spaced so that the budget lasts until the reset, and at zero the host waits for the reset.
A 429 (with ``Retry-After``, ``RateLimit-Reset`` or neither) pauses that host only.

Anything a remote sends is hostile input (design invariant 5): bodies are size-capped, JSON
shape errors and HTTP failures become `FetchError` with a bounded `reason`, never another
exception. TLS is verified (aiohttp's default SSL context; a failed handshake is reason
``tls``). Unless `allow_private`, URLs whose host is, or resolves to, a non-global address
(loopback, RFC 1918, CGNAT, link-local, ...) are refused, so a hostile DID document cannot
point the worker at internal services: checked before the request (a clear error, and IP
literals, which aiohttp never resolves) AND at connect time by `GuardedResolver` on the very
addresses aiohttp connects to, so a DNS answer that changes in between (DNS rebinding)
cannot slip through.

`allowed_private_hosts` names the exceptions one by one (``host:port``, as `host_key`
writes them): `firehose run --devnet` passes its own relay, PDS and PLC ports on loopback,
so the offline quick start can backfill while every other private address stays refused.
The exception is per port, not per address: a DID document naming another loopback port
(an admin interface, a database) is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from backfill.http_rules import (
    FETCH_REASONS,
    RATE_LIMIT_DEFAULT_PAUSE_S,
    RATE_LIMIT_LOW_REMAINING,
    RATE_LIMIT_MAX_PAUSE_S,
    XRPC_ERRORS,
    FetchError,
    host_key,
    is_forbidden_ip,
    parse_int,
    parse_reset,
    parse_retry_after,
)

__all__ = [
    "FETCH_REASONS",
    "RATE_LIMIT_DEFAULT_PAUSE_S",
    "FetchError",
    "ForbiddenAddressError",
    "GuardedResolver",
    "HostClient",
    "host_key",
    "is_forbidden_ip",
    "parse_reset",
    "parse_retry_after",
]

MAX_JSON_BYTES = 1024 * 1024  # listRepos pages (1000 repos) are ~200 KiB; DID docs ~1 KiB
MAX_ERROR_BODY_BYTES = 16 * 1024  # an XRPC error body is {"error", "message"}
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # between two reads of a body, not for the whole (multi-GB) body
JSON_TOTAL_TIMEOUT_S = 60.0
STREAM_CHUNK_BYTES = 64 * 1024
DEFAULT_PER_HOST_CONCURRENCY = 4
ADDRESS_CHECK_TTL_S = 300.0  # re-resolve a host name for the private-address check


class ForbiddenAddressError(OSError):
    """A name resolved to an address the worker must not connect to."""


class GuardedResolver(AbstractResolver):
    """Resolves with `base`, then refuses the whole answer if any address is not global.

    aiohttp connects to the addresses its resolver returns, so the check happens on what is
    actually dialled, at connect time, for every new connection (the connector's DNS cache
    only holds answers that passed). The error is an OSError, which aiohttp wraps in
    ClientConnectorDNSError; `HostClient` turns it into ``forbidden_address``.
    """

    def __init__(self, base: AbstractResolver, allowed: frozenset[str] = frozenset()) -> None:
        self.base = base
        self.allowed = allowed  # host:port keys exempt from the check (HostClient's list)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.base.resolve(host, port, family)
        if f"{host.lower()}:{port}" in self.allowed:
            return results
        for result in results:
            if is_forbidden_ip(result["host"]):
                raise ForbiddenAddressError(f"{host[:60]} -> {result['host']}")
        return results

    async def close(self) -> None:
        await self.base.close()


def _guard_connector(
    session: aiohttp.ClientSession, allowed: frozenset[str] = frozenset()
) -> AbstractResolver:
    """Install `GuardedResolver` in the session's connector; returns the resolver it wraps.

    aiohttp takes a resolver only when the connector is built, and callers build their own
    sessions; wrapping the connector's resolver here means no session handed to a
    `HostClient` can skip the connect-time check. A connector without one is refused loudly
    rather than left unguarded."""
    connector = session.connector
    resolver = getattr(connector, "_resolver", None)
    if not isinstance(connector, aiohttp.TCPConnector) or not isinstance(
        resolver, AbstractResolver
    ):
        raise TypeError("HostClient needs a session with an aiohttp TCPConnector")
    if isinstance(resolver, GuardedResolver):
        resolver.allowed |= allowed
        return resolver.base
    connector._resolver = GuardedResolver(resolver, allowed)
    connector.clear_dns_cache()  # answers cached before the guard was in place
    return resolver


@dataclass
class _Host:
    semaphore: asyncio.Semaphore
    paused_until: float = 0.0  # monotonic; no request before this
    next_at: float = 0.0  # monotonic; spacing while the budget is low
    remaining: int | None = None  # requests left in the current window (our estimate)
    reset_at: float | None = None  # monotonic end of the current window
    address_checked_until: float = 0.0


class HostClient:
    """An aiohttp session wrapper that is polite per host and raises only `FetchError`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        per_host_concurrency: int = DEFAULT_PER_HOST_CONCURRENCY,
        allow_private: bool = False,
        max_response_bytes: int = MAX_JSON_BYTES,
        allowed_private_hosts: Iterable[str] = (),
    ) -> None:
        if per_host_concurrency < 1:
            raise ValueError("per_host_concurrency must be >= 1")
        self.session = session
        self.per_host_concurrency = per_host_concurrency
        self.allow_private = allow_private
        self.max_response_bytes = max_response_bytes
        # host:port keys that may be private although allow_private is off (module doc).
        self.allowed_private_hosts = frozenset(key.lower() for key in allowed_private_hosts)
        # The resolver behind the connect-time guard: the pre-request check asks the same one.
        self._resolver = (
            None if allow_private else _guard_connector(session, self.allowed_private_hosts)
        )
        self._hosts: dict[str, _Host] = {}
        # Counters for metrics (engineer O exports them).
        self.rate_limit_pauses = 0  # 429s received
        self.rate_limit_waits = 0  # requests delayed because the budget was low
        self.requests = 0
        self.bytes_received = 0

    # -- introspection -------------------------------------------------------------------

    def paused_hosts(self) -> dict[str, float]:
        """host -> seconds until it may be asked again, for hosts waiting on a rate limit."""
        now = time.monotonic()
        return {key: h.paused_until - now for key, h in self._hosts.items() if h.paused_until > now}

    def known_hosts(self) -> set[str]:
        return set(self._hosts)

    # -- requests ------------------------------------------------------------------------

    async def get_json(self, url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET and parse a JSON body of at most `max_response_bytes`."""
        timeout = aiohttp.ClientTimeout(
            total=JSON_TOTAL_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        )
        async with self._request(url, params, timeout, self.max_response_bytes) as resp:
            body = bytearray()
            async for chunk in self._chunks(resp):
                body += chunk
                if len(body) > self.max_response_bytes:
                    raise FetchError(
                        "too_large", f"JSON body over {self.max_response_bytes} B", transient=False
                    )
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FetchError("bad_response", f"not JSON: {exc}", transient=False) from None

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        *,
        max_bytes: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """GET and yield the body as chunks. `max_bytes` refuses a bigger Content-Length
        up front (the caller still counts: the header may lie or be absent). `headers`: extra
        request headers (a devnet handle check names its virtual host, backfill/handles.py)."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        )
        async with self._request(url, params, timeout, max_bytes, headers) as resp:
            yield self._chunks(resp)

    # -- internals -----------------------------------------------------------------------

    def _host(self, key: str) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(asyncio.Semaphore(self.per_host_concurrency))
        return host

    async def _check_address(self, url: str, host: _Host) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("bad_url", url[:100], transient=False)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError("bad_url", url[:100], transient=False) from None
        if self._resolver is None or host.address_checked_until > time.monotonic():
            return
        if host_key(url) in self.allowed_private_hosts:
            return
        name = parts.hostname
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
            addresses = [name]
        except ValueError:
            try:
                infos = await self._resolver.resolve(name, port, socket.AF_UNSPEC)
            except (OSError, UnicodeError) as exc:
                raise FetchError(
                    "connection", f"resolve {name[:60]}: {exc}", transient=True
                ) from None
            addresses = [info["host"] for info in infos]
        # Every address must be global: aiohttp may connect to any of them. A DNS answer
        # that changes after this check meets `GuardedResolver` at connect time.
        for address in addresses:
            if is_forbidden_ip(address):
                raise FetchError("forbidden_address", f"{name[:60]} -> {address}", transient=False)
        host.address_checked_until = time.monotonic() + ADDRESS_CHECK_TTL_S

    async def _wait_turn(self, host: _Host) -> None:
        """Sleep while the host is paused or its low budget asks for spacing."""
        while True:
            now = time.monotonic()
            if host.reset_at is not None and now >= host.reset_at:
                host.remaining, host.reset_at = None, None  # a new window: budget unknown
            if host.remaining is not None and host.remaining <= 0 and host.reset_at is not None:
                host.paused_until = max(host.paused_until, host.reset_at)
            wake = max(host.paused_until, host.next_at)
            if wake <= now:
                break
            self.rate_limit_waits += 1
            await asyncio.sleep(wake - now)
        if host.remaining is not None:
            host.remaining -= 1  # this request spends budget before its response says so
            if host.reset_at is not None and host.remaining < RATE_LIMIT_LOW_REMAINING:
                left_s = max(0.0, host.reset_at - now)
                host.next_at = now + left_s / (max(host.remaining, 0) + 1)

    def _learn_limits(self, host: _Host, headers: Mapping[str, str]) -> None:
        remaining = parse_int(headers.get("RateLimit-Remaining"))
        reset_s = parse_reset(headers.get("RateLimit-Reset"), time.time())
        if remaining is None:
            return
        now = time.monotonic()
        reset_at = now + min(reset_s, RATE_LIMIT_MAX_PAUSE_S) if reset_s is not None else None
        same_window = (
            host.reset_at is not None and reset_at is not None and reset_at <= host.reset_at + 1.0
        )
        if same_window and host.remaining is not None:
            # Responses can arrive out of order: never let a stale, higher figure win over
            # our own count of requests already sent in this window.
            host.remaining = min(host.remaining, remaining)
        else:
            host.remaining = remaining
            host.reset_at = reset_at

    def _pause_for_429(self, host: _Host, headers: Mapping[str, str]) -> float:
        now_epoch = time.time()
        pause = parse_retry_after(headers.get("Retry-After"), now_epoch)
        if pause is None:
            pause = parse_reset(headers.get("RateLimit-Reset"), now_epoch)
        if pause is None:
            pause = RATE_LIMIT_DEFAULT_PAUSE_S
        pause = min(max(pause, 0.0), RATE_LIMIT_MAX_PAUSE_S)
        host.paused_until = max(host.paused_until, time.monotonic() + pause)
        host.remaining, host.reset_at = None, None
        self.rate_limit_pauses += 1
        return pause

    @asynccontextmanager
    async def _request(
        self,
        url: str,
        params: Mapping[str, Any] | None,
        client_timeout: aiohttp.ClientTimeout,
        max_bytes: int | None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        key = host_key(url)
        host = self._host(key)
        await self._check_address(url, host)
        async with host.semaphore:
            await self._wait_turn(host)
            self.requests += 1
            try:
                # Redirects are not followed: a redirect could lead to a private address
                # behind the check above, and no XRPC endpoint we call redirects.
                resp = await self.session.get(
                    url,
                    params=params,
                    headers=headers,
                    timeout=client_timeout,
                    allow_redirects=False,
                )
            except TimeoutError:
                raise FetchError("timeout", key, transient=True) from None
            except aiohttp.ClientSSLError as exc:
                # An untrusted or wrong-host certificate: retried later like a connection
                # failure, and always verified (there is no switch to turn verification off).
                raise FetchError("tls", f"{key}: {exc}", transient=True) from None
            except (aiohttp.ClientError, OSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                    exc.os_error, ForbiddenAddressError
                ):
                    raise FetchError(
                        "forbidden_address", str(exc.os_error), transient=False
                    ) from None
                detail = f"{type(exc).__name__}: {exc}"
                raise FetchError("connection", detail, transient=True) from None
            # Exceptions raised by the caller's body arrive at `yield`: they pass through
            # unchanged (a local disk error must not look like a network failure).
            try:
                self._learn_limits(host, resp.headers)
                await self._check_status(host, resp)
                length = resp.content_length
                if max_bytes is not None and length is not None and length > max_bytes:
                    raise FetchError("too_large", f"Content-Length {length}", transient=False)
                yield resp
            except BaseException:
                resp.close()  # drop the connection: the body may be half read
                raise
            resp.release()

    async def _check_status(self, host: _Host, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if 200 <= status < 300:
            return
        if status == 429:
            pause = self._pause_for_429(host, resp.headers)
            raise FetchError(
                "rate_limited",
                f"paused {pause:.0f} s",
                transient=True,
                retry_after_s=pause,
                status=status,
            )
        if status >= 500 or status == 408:
            raise FetchError("server_error", f"HTTP {status}", transient=True, status=status)
        if 300 <= status < 400:
            raise FetchError(
                "bad_response", f"HTTP {status} redirect", transient=False, status=status
            )
        error = await self._xrpc_error(resp)
        reason = XRPC_ERRORS.get(error or "")
        if reason is None:
            reason = "not_found" if status in (404, 410) else "client_error"
        raise FetchError(
            reason, f"HTTP {status} {error or ''}".strip(), transient=False, status=status
        )

    async def _xrpc_error(self, resp: aiohttp.ClientResponse) -> str | None:
        """The ``error`` name of an XRPC error body, read within a small cap."""
        try:
            body = await resp.content.read(MAX_ERROR_BODY_BYTES)
            doc = json.loads(body)
        except (ValueError, aiohttp.ClientError, OSError, TimeoutError, RecursionError):
            return None
        error = doc.get("error") if type(doc) is dict else None
        return error[:64] if type(error) is str else None

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_chunked(STREAM_CHUNK_BYTES):
                self.bytes_received += len(chunk)
                yield chunk
        except TimeoutError:
            raise FetchError("timeout", "reading body", transient=True) from None
        except aiohttp.ClientPayloadError as exc:
            raise FetchError("truncated", str(exc), transient=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise FetchError("connection", f"{type(exc).__name__}: {exc}", transient=True) from None
