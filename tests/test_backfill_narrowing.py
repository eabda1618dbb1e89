"""The backfill's narrowed enumeration (issue 9) against a real PostgreSQL and a real aiohttp
relay on loopback: dormant repos not queued and counted (job row, status --json, metric),
listReposByCollection passes with dedup, resume mid-pass, fallback to listRepos, settings.

The relay below serves ``listRepos`` (entries with revs) and ``listReposByCollection``
(pages of ``{did}``) over HTTP; the service enumerates through the real `HttpNetwork`
(relay_http's parsers, HostClient). Only the repo download is replaced (`fetch` counts the
DIDs asked for and returns one record): what is under test is which repos get queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from backfill_http import serve
from backfill_support import WholeSnapshot, backfill_cli
from prometheus_client import CollectorRegistry

from backfill.hosts import HostClient
from backfill.network import HttpNetwork
from backfill.service import BackfillService
from backfill.settings import BackfillSettings
from firehose.envparse import ConfigError
from firehose.model import SnapshotRecord
from firehose.protocol.syntax import make_tid

CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
NOW = datetime.now(UTC)
FAST = BackfillSettings(days=30, batch_size=50, batch_delay_ms=0, max_concurrent=4, use_idle=False)
POST, LIKE, CUSTOM = "app.bsky.feed.post", "app.bsky.feed.like", "com.example.fish.catch"


def did(i: int) -> str:
    return f"did:plc:{i:024d}"


def rev_at(t: datetime) -> str:
    return make_tid(int(t.timestamp() * 1_000_000), 0)


# -- the relay -----------------------------------------------------------------------------


@dataclass
class Relay:
    """listRepos over `entries` (`list_page` a page), listReposByCollection over
    `holders[nsid]` (`coll_page` a page). `hold` parks the request for one (method,
    collection, cursor) until released; `unimplemented` answers listReposByCollection with
    (status, XRPC error name or None)."""

    entries: list[dict[str, Any]]
    holders: dict[str, list[str]] = field(default_factory=dict)
    list_page: int = 3
    coll_page: int = 2
    unimplemented: tuple[int, str | None] | None = None
    hold: tuple[str, str | None, str | None] | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)  # the held request arrived
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[tuple[str, str | None, str | None, int]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        app.router.add_get(
            "/xrpc/com.atproto.sync.listReposByCollection", self._list_repos_by_collection
        )
        return app

    async def _page(
        self, method: str, collection: str | None, request: web.Request, items: list[Any], n: int
    ) -> web.Response:
        cursor = request.query.get("cursor")
        limit = int(request.query["limit"])
        self.requests.append((method, collection, cursor, limit))
        if self.hold == (method, collection, cursor):
            self.held.set()
            await self.release.wait()
        start = int(cursor.removeprefix("c")) if cursor else 0
        chunk = items[start : start + min(n, limit)]
        end = start + len(chunk)
        body: dict[str, Any] = {"repos": chunk}
        if end < len(items):
            body["cursor"] = f"c{end}"
        return web.json_response(body)

    async def _list_repos(self, request: web.Request) -> web.Response:
        return await self._page("listRepos", None, request, self.entries, self.list_page)

    async def _list_repos_by_collection(self, request: web.Request) -> web.Response:
        if self.unimplemented is not None:
            status, error = self.unimplemented
            self.requests.append(("listReposByCollection", None, None, 0))
            if error is None:
                return web.Response(status=status, text="404 page not found")
            return web.json_response({"error": error, "message": "no"}, status=status)
        nsid = request.query["collection"]
        items = [{"did": d} for d in self.holders.get(nsid, [])]
        return await self._page("listReposByCollection", nsid, request, items, self.coll_page)

    def pages(self, method: str) -> list[tuple[str | None, str | None]]:
        return [(c, cur) for m, c, cur, _ in self.requests if m == method]


@dataclass
class Snap(WholeSnapshot):
    did: str
    rev: str
    data_cid: str = CID
    bytes_downloaded: int = 100

    def items(self, window: Any) -> Iterator[SnapshotRecord]:
        record = {"$type": POST, "createdAt": NOW.isoformat(), "text": "hi"}
        yield (POST, rev_at(NOW), self.rev, CID, record, False)

    def close(self) -> None:
        pass


class RelayNetwork(HttpNetwork):
    """The real HttpNetwork (listRepos / listReposByCollection over HTTP); `fetch` counts."""

    def __init__(self, http: HostClient, base: str) -> None:
        super().__init__(http, None, base, max_bytes=1 << 20, spool=Path("/nonexistent"))
        self.fetched: Counter[str] = Counter()

    async def fetch(self, d: str, *args: Any, **kwargs: Any) -> Any:
        self.fetched[d] += 1
        return Snap(d, rev_at(NOW))


@contextlib.asynccontextmanager
async def relay_network(relay: Relay) -> AsyncIterator[RelayNetwork]:
    async with serve(relay.app()) as base, aiohttp.ClientSession() as session:
        yield RelayNetwork(HostClient(session, allow_private=True), base)


@contextlib.asynccontextmanager
async def service_pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


def service(
    settings: BackfillSettings,
    pool: asyncpg.Pool,
    net: RelayNetwork,
    registry: CollectorRegistry | None = None,
    wanted: tuple[str, ...] = (),
) -> BackfillService:
    return BackfillService(
        settings, pool, registry or CollectorRegistry(), relay_url="ws://127.0.0.1:1",
        worker_id=0, live_pressure=None, network=net, wanted_collections=wanted,
    )  # fmt: skip


async def run_to_end(svc: BackfillService, timeout_s: float = 60) -> None:
    await asyncio.wait_for(svc.run(asyncio.Event()), timeout_s)
    assert svc.status()["state"] == "completed", svc.status()


async def queued(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT did FROM backfill_repos ORDER BY did")
    return [r["did"] for r in rows]


async def pages_cursor(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT cursor FROM firehose_cursor WHERE service = 'backfill'"))


# -- a relay of 10 repos: 4 dormant, 2 without rev, 1 inactive, 3 active in the window ------


def mixed_entries() -> tuple[list[dict[str, Any]], set[str]]:
    old, recent = NOW - timedelta(days=90), NOW - timedelta(days=2)
    entries: list[dict[str, Any]] = []
    dormant = set()
    for i in range(10):
        entry: dict[str, Any] = {"did": did(i), "head": CID}
        if i < 4:
            entry["rev"] = rev_at(old - timedelta(days=i))
            dormant.add(did(i))
        elif i < 6:
            pass  # no rev: downloaded
        elif i == 6:
            entry |= {"rev": rev_at(recent), "active": False, "status": "deactivated"}
        else:
            entry["rev"] = rev_at(recent + timedelta(hours=i))
        entries.append(entry)
    return entries, dormant


async def test_dormant_repos_are_not_queued_and_are_counted(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    entries, dormant = mixed_entries()
    relay = Relay(entries)
    registry = CollectorRegistry()
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        await run_to_end(service(FAST, pool, net, registry))
    wanted = sorted(did(i) for i in (4, 5, 7, 8, 9))  # no rev, or a rev in the window
    assert await queued(conn) == wanted
    assert sorted(net.fetched) == wanted and set(net.fetched.values()) == {1}
    assert not dormant & set(net.fetched)
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["status"] == "completed"
    assert (job["repos_total"], job["repos_done"], job["repos_skipped_dormant"]) == (5, 5, 4)
    assert job["list_method"] == "listRepos" and job["list_fallback"] is None
    summary = json.loads(job["summary"])
    assert summary["repos_skipped_dormant"] == 4 and summary["list_method"] == "listRepos"
    assert job["list_pages"] == 4 and await pages_cursor(conn) == 4  # 10 entries, 3 a page
    sample = registry.get_sample_value
    assert sample("backfill_repos_skipped_total", {"reason": "dormant"}) == 4
    assert sample("backfill_repos_skipped_total", {"reason": "inactive"}) == 1
    assert sample("backfill_repos_skipped_total", {"reason": "invalid"}) == 0
    assert sample("backfill_enumeration_pages_total", {"method": "listRepos"}) == 4
    assert relay.pages("listReposByCollection") == []
    # `firehose backfill status`, both forms.
    out = await asyncio.to_thread(backfill_cli, db_dsn, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["repos"]["skipped_dormant"] == 4
    assert status["enumeration"]["method"] == "listRepos"
    text = await asyncio.to_thread(backfill_cli, db_dsn, "status")
    assert "Skipped:   4 dormant" in text.stdout and "Listing:   listRepos" in text.stdout


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        (replace(FAST, skip_dormant=False), "skip off"),
        (replace(FAST, days=-1), "whole history"),
    ],
    ids=["BACKFILL_SKIP_DORMANT=false", "BACKFILL_DAYS=-1"],
)
async def test_every_active_repo_is_queued_without_the_skip(
    db_dsn: str, conn: asyncpg.Connection, settings: BackfillSettings, why: str
) -> None:
    entries, dormant = mixed_entries()
    async with relay_network(Relay(entries)) as net, service_pool(db_dsn) as pool:
        await run_to_end(service(settings, pool, net))
    active = sorted(e["did"] for e in entries if e.get("active", True))
    assert await queued(conn) == active, why
    assert dormant <= set(net.fetched)
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["repos_skipped_dormant"] == 0 and job["repos_done"] == 9


# -- listReposByCollection -----------------------------------------------------------------


def collection_relay(**kw: Any) -> Relay:
    entries, _ = mixed_entries()
    holders = {
        POST: [did(i) for i in (0, 1, 2, 4, 7)],  # 0..2 are dormant by rev: still queued
        CUSTOM: [did(i) for i in (2, 3, 9)],  # did(2) in both passes
        LIKE: [did(i) for i in range(10)],  # not wanted: never asked
    }
    return Relay(entries, holders, **kw)


async def test_by_collection_passes_dedupe_across_nsids(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    relay = collection_relay()
    registry = CollectorRegistry()
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        await run_to_end(service(FAST, pool, net, registry, wanted=(POST, CUSTOM)))
    holders = sorted(did(i) for i in (0, 1, 2, 3, 4, 7, 9))
    assert await queued(conn) == holders
    assert sorted(net.fetched) == holders and set(net.fetched.values()) == {1}
    # One pass per NSID in sorted order (app.* < com.*), each paged with its own cursor.
    assert relay.pages("listReposByCollection") == [
        (POST, None), (POST, "c2"), (POST, "c4"), (CUSTOM, None), (CUSTOM, "c2"),
    ]  # fmt: skip
    assert {limit for m, _, _, limit in relay.requests if m != "listRepos"} == {2000}
    assert relay.pages("listRepos") == []
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["list_method"] == "listReposByCollection"
    assert list(job["list_collections_done"]) == [POST, CUSTOM]
    assert (job["repos_total"], job["repos_skipped_dormant"], job["list_pages"]) == (7, 0, 5)
    assert await pages_cursor(conn) == 5
    assert (
        registry.get_sample_value(
            "backfill_enumeration_pages_total", {"method": "listReposByCollection"}
        )
        == 5
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any("Enumerating repos by collection" in m for m in messages)
    assert any(m.startswith("[BACKFILL] Repo enumeration finished: 5 pages") for m in messages)


@pytest.mark.parametrize(
    ("wanted", "by_collection"),
    [((POST, "app.bsky.graph.*"), True), ((POST,), False), ((), True)],
    ids=["prefix entry", "BACKFILL_BY_COLLECTION=false", "no WANTED_COLLECTIONS"],
)
async def test_listrepos_when_by_collection_does_not_apply(
    db_dsn: str, conn: asyncpg.Connection, wanted: tuple[str, ...], by_collection: bool
) -> None:
    relay = collection_relay()
    settings = replace(FAST, by_collection=by_collection)
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        await run_to_end(service(settings, pool, net, wanted=wanted))
    assert relay.pages("listReposByCollection") == []
    assert len(relay.pages("listRepos")) == 4
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["list_method"] == "listRepos" and job["repos_skipped_dormant"] == 4


@pytest.mark.parametrize(
    "answer",
    [(404, None), (501, "MethodNotImplemented"), (501, None), (400, "MethodNotImplemented")],
    ids=["404", "501 MethodNotImplemented", "501", "400 MethodNotImplemented"],
)
async def test_relay_without_by_collection_falls_back_once(
    db_dsn: str,
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    answer: tuple[int, str | None],
) -> None:
    """The fallback is logged once and saved in the job: a restart does not ask again."""
    caplog.set_level(logging.INFO, logger="backfill")
    relay = collection_relay(unimplemented=answer, hold=("listRepos", None, "c3"))
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        stop = asyncio.Event()
        first = asyncio.create_task(service(FAST, pool, net, wanted=(POST,)).run(stop))
        await asyncio.wait_for(relay.held.wait(), 30)  # listRepos' second page, parked
        stop.set()
        await asyncio.wait_for(first, 30)
        job = await conn.fetchrow("SELECT * FROM backfill_jobs")
        assert (job["list_method"], job["list_cursor"], job["list_pages"]) == ("listRepos", "c3", 1)
        assert job["list_fallback"].startswith("listReposByCollection: ")
        relay.release.set()
        await run_to_end(service(FAST, pool, net, wanted=(POST,)))
    assert len(relay.pages("listReposByCollection")) == 1
    assert relay.pages("listRepos") == [(None, None), (None, "c3"), (None, "c3"), (None, "c6"),
                                        (None, "c9")]  # fmt: skip
    fallbacks = [r for r in caplog.records if "does not implement" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    # Same outcome as listRepos: dormant skipped, every other active repo queued.
    assert await queued(conn) == sorted(did(i) for i in (4, 5, 7, 8, 9))
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert (job["status"], job["list_pages"], job["repos_skipped_dormant"]) == ("completed", 4, 4)
    assert await pages_cursor(conn) == 4


async def test_a_restart_mid_pass_resumes_from_the_saved_nsid_and_cursor(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Stopped while the second pass (CUSTOM) waits for its page after cursor c2, a second
    service instance asks that very page next: no page lost, none saved twice."""
    relay = collection_relay(hold=("listReposByCollection", CUSTOM, "c2"))
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        stop = asyncio.Event()
        first = asyncio.create_task(service(FAST, pool, net, wanted=(POST, CUSTOM)).run(stop))
        await asyncio.wait_for(relay.held.wait(), 30)
        stop.set()
        await asyncio.wait_for(first, 30)
        job = await conn.fetchrow("SELECT * FROM backfill_jobs")
        assert (job["list_collection"], job["list_cursor"]) == (CUSTOM, "c2")
        assert list(job["list_collections_done"]) == [POST]
        assert job["list_pages"] == 4 and not job["enumeration_done"]
        assert await pages_cursor(conn) == 4
        relay.release.set()
        await run_to_end(service(FAST, pool, net, wanted=(POST, CUSTOM)))
    assert relay.pages("listReposByCollection") == [
        (POST, None), (POST, "c2"), (POST, "c4"), (CUSTOM, None), (CUSTOM, "c2"),  # first
        (CUSTOM, "c2"),  # the second instance: from the saved pass and cursor
    ]  # fmt: skip
    holders = sorted(did(i) for i in (0, 1, 2, 3, 4, 7, 9))
    assert await queued(conn) == holders
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert (job["status"], job["list_pages"], job["repos_total"]) == ("completed", 5, 7)
    assert await pages_cursor(conn) == 5
    # Every holder fetched; one the first instance had in flight at the stop (claimed as
    # soon as its page was queued) is handed back and fetched again by the second.
    assert sorted(net.fetched) == holders
    assert job["repos_done"] == 7


async def test_changed_settings_switch_a_by_collection_job_to_listrepos(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Resumed with a prefix entry, a job that began by collection pages listRepos from the
    start (its passes covered only some repos); the repos already queued stay."""
    relay = collection_relay(hold=("listReposByCollection", POST, "c2"))
    async with relay_network(relay) as net, service_pool(db_dsn) as pool:
        stop = asyncio.Event()
        first = asyncio.create_task(service(FAST, pool, net, wanted=(POST,)).run(stop))
        await asyncio.wait_for(relay.held.wait(), 30)
        stop.set()
        await asyncio.wait_for(first, 30)
        relay.release.set()
        await run_to_end(service(FAST, pool, net, wanted=(POST, "app.bsky.graph.*")))
    assert relay.pages("listRepos") == [(None, None), (None, "c3"), (None, "c6"), (None, "c9")]
    # POST holders 0, 1 (dormant by rev) came from the first pass; listRepos skips dormant.
    assert await queued(conn) == sorted(did(i) for i in (0, 1, 4, 5, 7, 8, 9))
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert (job["status"], job["list_method"], job["list_pages"]) == ("completed", "listRepos", 5)


# -- settings ------------------------------------------------------------------------------


def test_settings_parse_and_name_the_variable() -> None:
    default = BackfillSettings.from_env({})
    assert default.skip_dormant is True and default.by_collection is True
    off = BackfillSettings.from_env(
        {"BACKFILL_SKIP_DORMANT": "false", "BACKFILL_BY_COLLECTION": "0"}
    )
    assert off.skip_dormant is False and off.by_collection is False
    for name in ("BACKFILL_SKIP_DORMANT", "BACKFILL_BY_COLLECTION"):
        with pytest.raises(ConfigError, match=name):
            BackfillSettings.from_env({name: "maybe"})


async def test_dry_run_skips_dormant_repos_too(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    entries, dormant = mixed_entries()
    async with relay_network(Relay(entries)) as net, service_pool(db_dsn) as pool:
        assert len(dormant) == 4
        await asyncio.wait_for(
            service(replace(FAST, dry_run=True), pool, net).run(asyncio.Event()), 60
        )
    assert sorted(net.fetched) == sorted(did(i) for i in (4, 5, 7, 8, 9))
    assert any(
        "5 repos (0 failed)" in r.getMessage() and "4 dormant repos skipped" in r.getMessage()
        for r in caplog.records
    )
    assert await conn.fetchval("SELECT count(*) FROM backfill_jobs") == 0
