"""Handles of backfilled accounts, verified both ways and stored in ``actors.handle``. I/O.

The live stream sets ``actors.handle`` from ``#identity`` events only, so after a backfill
most accounts would have none. The backfill already fetches each account's DID document
(backfill/identity.py); `IdentityResolver.on_resolved` hands every fresh one to a
`HandleVerifier`, which, in the background and never holding up the repo's records:

1. takes the claimed handle from ``alsoKnownAs`` (backfill/handle_rules.py);
2. resolves the handle to a DID as https://atproto.com/specs/handle#handle-resolution says:
   DNS TXT ``_atproto.<handle>`` (``did=<DID>``) first, then
   ``https://<handle>/.well-known/atproto-did``, as the reference resolvers do; a DNS answer
   naming a DID decides (the HTTPS check is not asked then);
3. stores the handle only if that DID is the account's own (bidirectional verification), and
   only over no handle or an older one (`HANDLE_STORE`, sql/007_handle_at.sql): a handle from
   an ``#identity`` event applied after the DID document was fetched is never overwritten.

A failed verification leaves the handle as it is (NULL after a backfill) and counts its
reason (`HANDLE_RESULTS`); it never fails the repo. Bounded everywhere: a queue of
`QUEUE_MAX` accounts (an account offered while it is full is counted ``dropped``), `CONCURRENCY`
checks at once, `DNS_TIMEOUT_S` per DNS lookup, `HTTP_TIMEOUT_S` and `WELL_KNOWN_MAX_BYTES`
per well-known fetch, through a HostClient (per-host politeness, private addresses refused
unless allowed, redirects not followed), and a cache of handle -> DID answers (`CACHE_TTL_S`
for answers, `FAILURE_TTL_S` for failures, `CACHE_MAX_ENTRIES`).

Devnet: HANDLE_RESOLUTION_OVERRIDES maps a ``.test`` suffix to a base URL; a handle under it
is checked at ``<base>/.well-known/atproto-did`` with ``Host: <handle>`` and never in DNS
(docs/identity.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from prometheus_client import CollectorRegistry, Counter, Gauge

from backfill.handle_rules import (
    DNS_SUBDOMAIN,
    HANDLE_RESULTS,
    WELL_KNOWN_PATH,
    HandleSettings,
    claimed_handle,
    did_from_txt,
    did_from_well_known,
    resolvable,
)
from backfill.hosts import FetchError, HostClient
from firehose.storage.database import QUERY_RETRY_ERRORS

log = logging.getLogger("backfill")

QUEUE_MAX = 10_000  # accounts waiting for a check
CONCURRENCY = 8  # checks at once (each at most one DNS lookup and one HTTPS fetch)
DNS_TIMEOUT_S = 5.0  # the whole lookup, retries included
HTTP_TIMEOUT_S = 10.0  # the whole well-known fetch
# A DID is at most 2 KiB (https://atproto.com/specs/did); room for whitespace and a newline.
WELL_KNOWN_MAX_BYTES = 4096
CACHE_TTL_S = 3600.0  # a handle's answer (a DID, or "names no DID")
FAILURE_TTL_S = 300.0  # a timeout or network failure: asked again sooner
CACHE_MAX_ENTRIES = 100_000
# Every handle is a host of its own for the HostClient, which keeps per-host state for ever:
# past this many hosts, a fresh client is used (the old one's pauses are forgotten).
HTTP_HOSTS_MAX = 10_000
PER_HOST_CONCURRENCY = 2
# How much earlier than our clock the DID document counts as fetched, for the comparison with
# a handle stamped by the database's clock (#identity): covers skew between the two hosts.
CLOCK_MARGIN_S = 60.0
# After the job completes, queued checks may still run this long before the backfill ends.
DRAIN_MAX_S = 60.0

# $1 did, $2 handle, $3 when its DID document was fetched (less CLOCK_MARGIN_S). A handle
# of unknown age (handle_at NULL: set before sql/007) or newer is kept; a deleted account gets
# none. RETURNING says whether it was stored.
HANDLE_STORE = """
INSERT INTO actors AS a (did, handle, handle_at, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (did) DO UPDATE
   SET handle = EXCLUDED.handle, handle_at = EXCLUDED.handle_at, updated_at = now()
 WHERE a.status <> 'deleted'
   AND (a.handle IS NULL OR (a.handle_at IS NOT NULL AND a.handle_at < EXCLUDED.handle_at))
RETURNING 1
"""

_HTTP_REASONS = {
    "not_found": "not_found",
    "repo_not_found": "not_found",
    "timeout": "timeout",
    "too_large": "too_large",
    "forbidden_address": "forbidden_address",
    "connection": "connection",
    "tls": "connection",
    "truncated": "connection",
    "bad_url": "bad_syntax",
}


@dataclass(frozen=True)
class HandleMetrics:
    checks: Counter
    cache_hits: Counter
    stored: Counter
    queued: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HandleMetrics:
        m = cls(
            checks=Counter(
                "backfill_handle_checks_total",
                "Handles of backfilled accounts checked both ways (DNS TXT or HTTPS "
                "well-known naming the account's DID), by result: verified, or why not. "
                "Failures leave actors.handle as it is; a steady share of timeout or "
                "dns_error points at this host's DNS or network, not at the accounts.",
                ["result"],
                registry=registry,
            ),
            cache_hits=Counter(
                "backfill_handle_cache_hits_total",
                "Handle checks answered from the cache of handle -> DID answers.",
                registry=registry,
            ),
            stored=Counter(
                "backfill_handles_stored_total",
                "Verified handles written to actors.handle (stored), or not written because "
                "a handle from a newer #identity event (or of unknown age) is there, or the "
                "account is deleted (kept_newer).",
                ["outcome"],
                registry=registry,
            ),
            queued=Gauge(
                "backfill_handle_queue",
                f"Accounts waiting for a handle check (at most {QUEUE_MAX}; over it they "
                "are counted as dropped).",
                registry=registry,
            ),
        )
        for result in HANDLE_RESULTS:
            m.checks.labels(result)
        for outcome in ("stored", "kept_newer"):
            m.stored.labels(outcome)
        return m


@dataclass(frozen=True)
class Answer:
    """What a handle resolves to: a DID, or None and the bounded reason."""

    did: str | None
    reason: str = "verified"


class DnsTxt:
    """TXT lookups with dnspython's asyncio resolver: the system's name servers, or the
    given ones (tests run a DNS server on loopback)."""

    def __init__(
        self, nameservers: list[str] | None = None, port: int = 53, timeout_s: float = DNS_TIMEOUT_S
    ) -> None:
        self.error: str | None = None
        try:
            self.resolver: dns.asyncresolver.Resolver | None = dns.asyncresolver.Resolver(
                configure=nameservers is None
            )
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf: HTTPS only
            self.resolver, self.error = None, f"{type(exc).__name__}: {exc}"
            return
        if nameservers is not None:
            self.resolver.nameservers = nameservers
            self.resolver.port = port
        self.resolver.lifetime = timeout_s
        self.resolver.timeout = timeout_s

    async def lookup(self, handle: str) -> Answer:
        if self.resolver is None:
            return Answer(None, "dns_error")
        try:
            answer = await self.resolver.resolve(f"{DNS_SUBDOMAIN}.{handle}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return Answer(None, "not_found")
        except dns.exception.Timeout:
            return Answer(None, "timeout")
        except dns.exception.DNSException:
            return Answer(None, "dns_error")
        did = did_from_txt([getattr(rdata, "strings", ()) for rdata in answer])
        return Answer(did, "verified" if did else "not_found")


class HandleResolver:
    """handle -> DID (DNS, then HTTPS well-known), cached with a TTL and a size bound."""

    def __init__(
        self,
        http_factory: Callable[[], HostClient],
        settings: HandleSettings,
        dns_txt: DnsTxt | None = None,
        *,
        ttl_s: float = CACHE_TTL_S,
        failure_ttl_s: float = FAILURE_TTL_S,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self._http_factory = http_factory
        self._http = http_factory()
        self.settings = settings
        self.dns = dns_txt if dns_txt is not None else DnsTxt()
        self.ttl_s, self.failure_ttl_s = ttl_s, failure_ttl_s
        self.max_entries = max(1, max_entries)
        self._cache: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self.cache_hits = 0

    def cached(self, handle: str) -> Answer | None:
        entry = self._cache.get(handle)
        if entry is None or entry[0] <= time.monotonic():
            return None
        self._cache.move_to_end(handle)
        self.cache_hits += 1
        return entry[1]

    async def resolve(self, handle: str) -> Answer:
        hit = self.cached(handle)
        if hit is not None:
            return hit
        answer = await self._resolve(handle)
        # A timeout or a network failure may pass: ask again sooner than for an answer.
        lasting = answer.did is not None or answer.reason in ("not_found", "bad_syntax")
        ttl = self.ttl_s if lasting else self.failure_ttl_s
        self._cache[handle] = (time.monotonic() + ttl, answer)
        self._cache.move_to_end(handle)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return answer

    async def _resolve(self, handle: str) -> Answer:
        base = self.settings.override_for(handle)
        dns_answer = None
        if base is None:
            dns_answer = await self.dns.lookup(handle)
            if dns_answer.did is not None:
                return dns_answer
        web = await self._well_known(handle, base)
        if web.did is None and web.reason == "not_found" and dns_answer is not None:
            # Neither names a DID: a DNS failure says more than the web's 404.
            return dns_answer
        return web

    async def _well_known(self, handle: str, base: str | None) -> Answer:
        if len(self._http.known_hosts()) > HTTP_HOSTS_MAX:
            self._http = self._http_factory()
        url = f"{base or 'https://' + handle}{WELL_KNOWN_PATH}"
        headers = {"Host": handle} if base is not None else None
        body = bytearray()
        try:
            async with asyncio.timeout(HTTP_TIMEOUT_S):
                async with self._http.stream(
                    url, max_bytes=WELL_KNOWN_MAX_BYTES, headers=headers
                ) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if len(body) > WELL_KNOWN_MAX_BYTES:
                            return Answer(None, "too_large")
        except TimeoutError:
            return Answer(None, "timeout")
        except FetchError as exc:
            return Answer(None, _HTTP_REASONS.get(exc.reason, "http_error"))
        did = did_from_well_known(bytes(body))
        return Answer(did, "verified" if did else "bad_syntax")


class HandleVerifier:
    """The bounded background queue of accounts whose claimed handle is checked and stored."""

    def __init__(
        self,
        resolver: HandleResolver,
        conn: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        metrics: HandleMetrics,
        *,
        concurrency: int = CONCURRENCY,
        queue_max: int = QUEUE_MAX,
        clock_margin_s: float = CLOCK_MARGIN_S,
    ) -> None:
        self.resolver = resolver
        self.conn = conn
        self.metrics = metrics
        self.concurrency = max(1, concurrency)
        self.clock_margin_s = clock_margin_s
        self.queue: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue(max(1, queue_max))
        self._queued: set[str] = set()  # DIDs in the queue or being checked

    def offer(self, identity: Any, fetched_at: float) -> None:
        """An account's freshly fetched identity (IdentityResolver.on_resolved). Never
        blocks, never raises."""
        handle, malformed = claimed_handle(identity.also_known_as)
        if handle is None:
            if malformed:
                self._count("bad_syntax")
            return  # no handle claimed: nothing to verify
        if identity.did in self._queued:
            return
        try:
            self.queue.put_nowait((identity.did, handle, fetched_at))
        except asyncio.QueueFull:
            self._count("dropped")
            return
        self._queued.add(identity.did)
        self.metrics.queued.set(self.queue.qsize())

    async def run(self, halt: asyncio.Event, stop: asyncio.Event) -> None:
        """Check queued accounts until `halt`; then, unless `stop` (shutdown) is set, finish
        the queue for at most DRAIN_MAX_S (the job completed: its last repos' handles)."""
        workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        try:
            await halt.wait()
            if not stop.is_set():
                drained = asyncio.ensure_future(self.queue.join())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {drained, stopped}, timeout=DRAIN_MAX_S, return_when="FIRST_COMPLETED"
                )
                drained.cancel()
                stopped.cancel()
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            did, handle, fetched_at = await self.queue.get()
            try:
                await self.verify(did, handle, fetched_at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or an unforeseen error: count nothing, go on
                log.warning("[BACKFILL] handle check of %s failed: %s", did, exc)
            finally:
                self._queued.discard(did)
                self.queue.task_done()
                self.metrics.queued.set(self.queue.qsize())

    async def verify(self, did: str, handle: str, fetched_at: float) -> str:
        """Check `handle` for `did`, store it if verified; the result label."""
        if not resolvable(handle, self.resolver.settings):
            return self._count("bad_syntax")
        hits = self.resolver.cache_hits
        answer = await self.resolver.resolve(handle)
        if self.resolver.cache_hits > hits:
            self.metrics.cache_hits.inc()
        if answer.did is None:
            return self._count(answer.reason)
        if answer.did != did:
            return self._count("mismatch")
        self._count("verified")
        observed = datetime.fromtimestamp(fetched_at - self.clock_margin_s, UTC)
        try:
            async with self.conn() as conn:
                stored = await conn.fetchval(HANDLE_STORE, did, handle, observed)
        except QUERY_RETRY_ERRORS as exc:
            log.warning("[BACKFILL] could not store the handle of %s: %s", did, exc)
            return "verified"
        self.metrics.stored.labels("stored" if stored else "kept_newer").inc()
        return "verified"

    def _count(self, result: str) -> str:
        self.metrics.checks.labels(result if result in HANDLE_RESULTS else "http_error").inc()
        return result


async def verify_handles(ctx: Any, metrics: HandleMetrics, stop: asyncio.Event) -> None:
    """The backfill's hook (one task beside the repo tasks): verify the handle of every
    account whose DID document the backfill fetches, until the job halts. Does nothing when
    BACKFILL_VERIFY_HANDLES=false or the network is not the HTTP one (tests' fakes)."""
    settings: HandleSettings = ctx.settings.handles
    identities = getattr(ctx.network, "resolver", None)
    http = getattr(ctx.network, "http", None)
    if not settings.enabled or identities is None or not isinstance(http, HostClient):
        return
    verifier = HandleVerifier(HandleResolver(client_like(http), settings), ctx.conn, metrics)
    identities.on_resolved = verifier.offer
    try:
        await verifier.run(ctx.halt, stop)
    finally:
        identities.on_resolved = None


def client_like(http: HostClient) -> Callable[[], HostClient]:
    """A factory of HostClients for well-known fetches, with `http`'s session and its private
    address rules, a small per-host concurrency and the well-known body cap."""

    def make() -> HostClient:
        return HostClient(
            http.session,
            per_host_concurrency=PER_HOST_CONCURRENCY,
            allow_private=http.allow_private,
            max_response_bytes=WELL_KNOWN_MAX_BYTES,
            # `run --devnet`'s own loopback ports (its PDS hosts answer the well-known).
            allowed_private_hosts=http.allowed_private_hosts,
        )

    return make


@contextlib.asynccontextmanager
async def pool_conn(pool: Any) -> AsyncIterator[Any]:
    """`HandleVerifier.conn` for a bare pool (tools and tests)."""
    async with pool.acquire() as conn:
        yield conn
