"""What the orchestration needs from the network, as a Protocol, and its HTTP implementation.

The service talks to `Network` only, so unit tests inject a fake (counting in-flight
downloads, failing on cue) and the real thing composes engineer N's modules: listRepos on
the relay, DID resolution (PLC / did:web), getRepo through the polite per-host client.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from backfill.settings import BackfillSettings

if TYPE_CHECKING:
    from backfill.blocks import MemoryBudget

MIB = 1024 * 1024
LIST_REPOS_PAGE = 1000  # listRepos' maximum page size
LIST_REPOS_BY_COLLECTION_PAGE = 2000  # listReposByCollection's maximum page size


class RepoEntry(Protocol):
    @property
    def did(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def rev(self) -> str | None:
        """The repo's latest commit (listRepos); None when the method does not say."""
        ...


class RepoPage(Protocol):
    @property
    def repos(self) -> Sequence[RepoEntry]: ...
    @property
    def cursor(self) -> str | None: ...
    @property
    def invalid(self) -> int:
        """Malformed entries the page parser dropped."""
        ...


class Snapshot(Protocol):
    did: str
    rev: str
    data_cid: str
    bytes_downloaded: int
    # What kind of answer it was and what the window download did (backfill.since,
    # backfill.window_fetch; counted by backfill.window_metrics).
    kind: str
    since_fallback: str | None
    absent_subtrees: int
    absent_records: int
    profile_fetch: str | None

    @property
    def head(self) -> tuple[str, str, str] | None:
        """(did, rev, data cid) of its commit; None when it knows no commit."""
        ...

    def items(self, window: Any) -> Iterable[Any]: ...
    def close(self) -> None: ...


class Network(Protocol):
    @property
    def rate_limit_pauses(self) -> int: ...

    async def list_repos(self, cursor: str | None, limit: int) -> RepoPage: ...
    async def list_repos_by_collection(
        self, collection: str, cursor: str | None, limit: int
    ) -> RepoPage: ...
    async def fetch(
        self, did: str, *, since: str | None = None, want_profile: bool = False
    ) -> Snapshot:
        """The repo (with `since`: what was written after it, plus the profile through
        getRecord when `want_profile` and the answer lacks it: backfill/window_fetch.py)."""
        ...

    def paused_hosts(self) -> dict[str, float]: ...
    def known_hosts(self) -> set[str]:
        """Hosts repos are downloaded from: when all are paused, the job is rate limited."""
        ...


class HttpNetwork:
    """The real network: relay listRepos, identity resolution, getRepo spooled to disk."""

    def __init__(
        self,
        http: Any,
        resolver: Any,
        relay_base: str,
        *,
        max_bytes: int,
        spool: Path,
        memory: MemoryBudget | None = None,
    ):
        self._http = http
        self._memory = memory  # what this process's repos may hold in memory together
        self._resolver = resolver
        self._relay_base = relay_base
        self._max_bytes = max_bytes
        self._spool = spool
        # PDS hosts asked for a repo. The relay and the PLC directory are not among them:
        # they are never paused by a PDS 429, so counting them would keep the job from
        # ever showing paused_rate_limited while every PDS is paused.
        self._repo_hosts: set[str] = set()

    @property
    def rate_limit_pauses(self) -> int:
        return int(self._http.rate_limit_pauses)

    @property
    def http(self) -> Any:
        """The HostClient (backfill/handles.py builds its well-known client from it)."""
        return self._http

    @property
    def resolver(self) -> Any:
        """The IdentityResolver (backfill/handles.py listens to its fresh identities)."""
        return self._resolver

    async def list_repos(self, cursor: str | None, limit: int) -> RepoPage:
        from backfill.relay_http import list_repos

        page: RepoPage = await list_repos(self._http, self._relay_base, cursor, limit)
        return page

    async def list_repos_by_collection(
        self, collection: str, cursor: str | None, limit: int
    ) -> RepoPage:
        from backfill.relay_http import list_repos_by_collection

        page: RepoPage = await list_repos_by_collection(
            self._http, self._relay_base, collection, cursor, limit
        )
        return page

    async def fetch(
        self, did: str, *, since: str | None = None, want_profile: bool = False
    ) -> Snapshot:
        from backfill.hosts import FetchError
        from backfill.http_rules import host_key
        from backfill.window_fetch import fetch_window

        identity = await self._resolver.resolve(did)
        self._repo_hosts.add(host_key(identity.pds))
        try:
            snap: Snapshot = await fetch_window(
                self._http, identity.pds, did, since=since, want_profile=want_profile,
                max_bytes=self._max_bytes, spool_dir=self._spool, memory=self._memory,
            )  # fmt: skip
        except FetchError as err:
            if err.reason in ("not_found", "repo_not_found"):
                # The account may have moved to another PDS: re-resolve on the next attempt.
                self._resolver.invalidate(did)
            raise
        return snap

    def paused_hosts(self) -> dict[str, float]:
        return dict(self._http.paused_hosts())

    def known_hosts(self) -> set[str]:
        return set(self._repo_hosts)


@contextlib.asynccontextmanager
async def open_http_network(
    settings: BackfillSettings,
    relay_url: str,
    *,
    per_host_concurrency: int | None = None,
    memory_mb: int | None = None,
) -> AsyncIterator[HttpNetwork]:
    """The network of one process; `memory_mb`, its part of BACKFILL_MAX_MEMORY_MB (default:
    all of it), sizes the MemoryBudget of its in-memory repos (blocks.py)."""
    import aiohttp

    from backfill.blocks import MEMORY_BUDGET_FRACTION, MemoryBudget
    from backfill.hosts import HostClient
    from backfill.identity import IdentityResolver
    from backfill.relay_http import relay_http_base

    spool = Path(tempfile.mkdtemp(prefix="firehose-backfill-"))
    try:
        async with aiohttp.ClientSession() as session:
            http = HostClient(
                session,
                per_host_concurrency=per_host_concurrency or max(4, settings.max_concurrent),
                allow_private=settings.allow_private_network,
                allowed_private_hosts=settings.allowed_private_hosts,
            )
            resolver = IdentityResolver(http, settings.plc_url)
            yield HttpNetwork(
                http,
                resolver,
                relay_http_base(relay_url),
                max_bytes=settings.max_repo_mb * MIB,
                spool=spool,
                memory=MemoryBudget(
                    (memory_mb or settings.max_memory_mb) * MIB // MEMORY_BUDGET_FRACTION
                ),
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
