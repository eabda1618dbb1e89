"""The gate's first step: every commit's signature, checked against its repo's signing key.

`SignatureScreen` (a `firehose.live.gate.Screen`) takes the signing key of each repo from
its DID document (https://atproto.com/specs/did: the ``#atproto`` verification method),
through `backfill.identity.IdentityResolver` (PLC directory / did:web, TTL cache) and
`backfill.hosts.HostClient` (capped bodies, TLS verified, private addresses refused unless
ALLOW_PRIVATE_NETWORK). For one slice of the stream:

1. Keys are resolved before any check, the cache misses of the slice CONCURRENTLY
   (`RESOLVE_CONCURRENCY` at once): a cold cache costs one round trip per slice, not one
   per repo, so the stream is not serialised behind the PLC directory. The lookups of a
   slice get `LOOKUP_DEADLINE_S`, and a failed lookup is remembered `FAILURE_TTL_S`, so a
   slow or unreachable directory costs the stream seconds, not a stall.
2. ``#identity`` takes effect in stream order: commits of a repo before its ``#identity``
   in the slice are checked with the key known before it, later ones with a freshly
   fetched document, and the cache entry is dropped so later slices fetch it too.
3. A check that fails re-resolves the key once (the account may have rotated its key, and
   our cached document predates the rotation) and checks again, unless this repo's document
   was re-fetched less than `REFRESH_MIN_INTERVAL_S` ago: a flood of forged commits must
   not turn into a flood of requests to the PLC directory.
4. Still failing: the event is dropped (``bad_signature``) and its repo queued for a resync
   through the backfill path, which fetches the repo from its PDS. A document that cannot
   be resolved (or has no usable key): dropped (``identity_unavailable``) and resynced, so
   the resync retries later and no genuine data is lost for good.

Checks run on the event loop (68 us per K-256 commit, 290 us per P-256 on the CI machine,
see firehose.protocol.signature), yielding every `VERIFY_YIELD_EVERY` checks so the batch
transaction in flight keeps being served. Warnings are bounded (`LogBudget`): a flood of
forged commits cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from backfill.hosts import HostClient
from backfill.identity import IdentityError, IdentityResolver
from firehose.live.gate import Verdict
from firehose.model import CommitEvent, Event, IdentityEvent, SyncEvent
from firehose.protocol.signature import KeyFormatError, PublicKey, parse_multikey, verify_commit

log = logging.getLogger("firehose.verify")

RESOLVE_CONCURRENCY = 32  # DID documents fetched at once (also the per-host limit)
REFRESH_MIN_INTERVAL_S = 60.0  # a repo's document is re-fetched after a failure at most this often
VERIFY_YIELD_EVERY = 32  # checks between two yields to the event loop (~2-10 ms of CPU)
KEY_CACHE_MAX = 100_000  # parsed keys kept (~200 B each); cleared when full
# A slow or unreachable PLC directory must not stall the live stream: the lookups of one
# slice get this long (a healthy directory answers in ~0.1 s), the rest count as failed.
LOOKUP_DEADLINE_S = 5.0
# A failed lookup is remembered this long: the repo's commits are dropped (and resynced
# later) without asking again, so an outage or a flood of unknown DIDs costs one lookup
# per repo per FAILURE_TTL_S, not one per slice.
FAILURE_TTL_S = 10.0
LOG_BUDGET_LINES = 20  # warnings per LOG_BUDGET_WINDOW_S, then one summary line
LOG_BUDGET_WINDOW_S = 60.0
SIGNATURE_RESULTS = ("valid", "valid_after_refresh", "invalid", "no_identity")


@dataclass(frozen=True)
class VerifyMetrics:
    checked: Counter
    seconds: Histogram
    identity_cache: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> VerifyMetrics:
        return cls(
            checked=Counter(
                "firehose_signatures_total",
                "Commit signatures checked (VERIFY_SIGNATURES=true), by result: valid, "
                "valid_after_refresh (the repo had rotated its key), invalid (dropped as "
                "bad_signature), no_identity (DID document unresolvable: dropped as "
                "identity_unavailable). Anything but valid should stay near zero.",
                ["result"],
                registry=registry,
            ),
            seconds=Histogram(
                "firehose_verify_seconds",
                "Seconds the signature check took per collected slice of events, DID "
                "lookups included. A tail near BATCH_MAX_WAIT_MS means the PLC directory "
                "is slow or the cache too cold for the event rate.",
                buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
            identity_cache=Gauge(
                "firehose_identity_cache_entries",
                "DID documents cached for signature checks (one per recently active repo; "
                "entries expire after an hour).",
                registry=registry,
            ),
        )


class LogBudget:
    """At most `lines` log lines per `window_s`; the rest are counted and summarised."""

    def __init__(self, lines: int = LOG_BUDGET_LINES, window_s: float = LOG_BUDGET_WINDOW_S):
        self.lines = lines
        self.window_s = window_s
        self._window_start = -window_s
        self._used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self.suppressed:
                log.warning("%d more signature warnings suppressed", self.suppressed)
            self._window_start, self._used, self.suppressed = now, 0, 0
        if self._used < self.lines:
            self._used += 1
            return True
        self.suppressed += 1
        return False


@dataclass(frozen=True, slots=True)
class _Lookup:
    key: PublicKey | None
    error: str = ""  # why there is no key (bounded text for the log)


class SignatureScreen:
    """Gate step: drop commits whose signature does not verify (see module doc)."""

    def __init__(
        self,
        resolver: IdentityResolver,
        metrics: VerifyMetrics,
        *,
        concurrency: int = RESOLVE_CONCURRENCY,
        refresh_min_interval_s: float = REFRESH_MIN_INTERVAL_S,
        lookup_deadline_s: float = LOOKUP_DEADLINE_S,
        session: aiohttp.ClientSession | None = None,
        owns_did: Callable[[str], bool] | None = None,
    ) -> None:
        self.resolver = resolver
        # Sharded workers (WORKER_COUNT > 1): other shards' repos are not indexed here
        # (BatchBuilder skips them), so their keys are neither fetched nor checked.
        self._owns_did = owns_did
        self.metrics = metrics
        self.refresh_min_interval_s = refresh_min_interval_s
        self.lookup_deadline_s = lookup_deadline_s
        self._failures: OrderedDict[str, tuple[float, str]] = OrderedDict()  # did -> (until, why)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._session = session  # owned: closed by aclose()
        self._keys: dict[tuple[str, str | None], PublicKey] = {}
        self._refreshed: OrderedDict[str, float] = OrderedDict()  # did -> monotonic time
        self._log_budget = LogBudget()
        self._results = {r: metrics.checked.labels(r) for r in SIGNATURE_RESULTS}
        metrics.identity_cache.set_function(lambda: len(resolver))

    @classmethod
    def open(
        cls,
        plc_url: str,
        allow_private: bool,
        registry: CollectorRegistry,
        owns_did: Callable[[str], bool] | None = None,
        allowed_private_hosts: Sequence[str] = (),
    ) -> SignatureScreen:
        """The worker's screen: its own HTTP session (closed by `aclose`), on `registry`."""
        session = aiohttp.ClientSession()
        http = HostClient(
            session,
            per_host_concurrency=RESOLVE_CONCURRENCY,
            allow_private=allow_private,
            allowed_private_hosts=allowed_private_hosts,
        )
        resolver = IdentityResolver(http, plc_url)
        return cls(resolver, VerifyMetrics.create(registry), session=session, owns_did=owns_did)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def screen(self, events: Sequence[Event], verdict: Verdict) -> None:
        started = time.perf_counter()
        # Which key each commit is checked with: before any #identity of its repo in this
        # slice, the known one; after it, a fresh document (stream order, module doc 2).
        identity_seen: set[str] = set()
        work: list[tuple[int, CommitEvent | SyncEvent, bool]] = []
        owns = self._owns_did
        for index, event in enumerate(events):
            if index in verdict.dropped:
                continue
            if isinstance(event, CommitEvent | SyncEvent):
                if owns is None or owns(event.did):
                    work.append((index, event, event.did in identity_seen))
            elif isinstance(event, IdentityEvent):
                identity_seen.add(event.did)
        before = await self._resolve_all(e.did for _, e, after in work if not after)
        for did in identity_seen:
            self.resolver.invalidate(did)
            self._failures.pop(did, None)  # the new document may resolve
        after = await self._resolve_all(e.did for _, e, late in work if late)
        refreshed: dict[str, _Lookup] = {}  # did -> key re-resolved after a failed check
        for done, (index, event, late) in enumerate(work, 1):
            lookup = (after if late else before)[event.did]
            again = refreshed.get(event.did)
            if again is not None and again.key is not None:
                lookup = again  # the key was re-resolved after an earlier failed check
            await self._judge(index, event, lookup, refreshed, verdict)
            if done % VERIFY_YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if work:
            self.metrics.seconds.observe(time.perf_counter() - started)

    async def _judge(
        self,
        index: int,
        event: CommitEvent | SyncEvent,
        lookup: _Lookup,
        refreshed: dict[str, _Lookup],
        verdict: Verdict,
    ) -> None:
        did, block = event.did, event.commit_block or b""
        key = lookup.key
        if key is not None:
            if verify_commit(key, block):
                self._results["valid"].inc()
                return
            # Key rotation: our document may predate it. Re-resolve once (module doc 3).
            if did not in refreshed and self._may_refresh(did):
                self.resolver.invalidate(did)
                retry = refreshed[did] = (await self._resolve_all([did]))[did]
                if retry.key is not None and retry.key != key and verify_commit(retry.key, block):
                    self._results["valid_after_refresh"].inc()
                    return
                key = retry.key
                lookup = retry
        if key is None:
            reason, result, detail = "identity_unavailable", "no_identity", lookup.error
        else:
            reason, result, detail = "bad_signature", "invalid", f"{key.curve} key"
        self._results[result].inc()
        verdict.drop(index, reason)
        verdict.resync(did, reason)
        if self._log_budget.allow():
            log.warning(
                "dropping %s seq %d of %s (%s): %s; repo queued for a resync",
                type(event).__name__,
                event.seq,
                did,
                reason,
                detail,
            )

    def _may_refresh(self, did: str) -> bool:
        now = time.monotonic()
        last = self._refreshed.get(did)
        if last is not None and now - last < self.refresh_min_interval_s:
            return False
        self._refreshed[did] = now
        self._refreshed.move_to_end(did)
        while len(self._refreshed) > KEY_CACHE_MAX:
            self._refreshed.popitem(last=False)
        return True

    async def _resolve_all(self, dids: Iterable[str]) -> dict[str, _Lookup]:
        unique = list(dict.fromkeys(dids))
        if not unique:
            return {}
        tasks = [asyncio.ensure_future(self._lookup(did)) for did in unique]
        done, pending = await asyncio.wait(tasks, timeout=self.lookup_deadline_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)  # cancelled: their connections are released
        out: dict[str, _Lookup] = {}
        for did, task in zip(unique, tasks, strict=True):
            if task in done:
                out[did] = task.result()
            else:
                out[did] = self._failed(did, f"no answer within {self.lookup_deadline_s:g} s")
        return out

    def _failed(self, did: str, why: str) -> _Lookup:
        self._failures[did] = (time.monotonic() + FAILURE_TTL_S, why)
        self._failures.move_to_end(did)
        while len(self._failures) > KEY_CACHE_MAX:
            self._failures.popitem(last=False)
        return _Lookup(None, why)

    async def _lookup(self, did: str) -> _Lookup:
        failure = self._failures.get(did)
        if failure is not None:
            if failure[0] > time.monotonic():
                return _Lookup(None, f"failed less than {FAILURE_TTL_S:g} s ago: {failure[1]}")
            del self._failures[did]
        async with self._semaphore:
            try:
                identity = await self.resolver.resolve(did)
            except IdentityError as err:
                return self._failed(did, str(err))
        if identity.signing_key is None:
            return _Lookup(None, "DID document has no #atproto signing key")
        cache_key = (identity.signing_key, identity.signing_key_type)
        key = self._keys.get(cache_key)
        if key is None:
            try:
                key = parse_multikey(identity.signing_key, identity.signing_key_type)
            except KeyFormatError as err:
                return _Lookup(None, f"unusable signing key: {err}")
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            self._keys[cache_key] = key
        return _Lookup(key)
