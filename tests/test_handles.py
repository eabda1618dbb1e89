"""Handles of backfilled accounts (backfill/handles.py): verified both ways against real
HTTP servers and a real DNS server on loopback, stored in a real PostgreSQL, never over a
newer #identity handle; and end to end through the devnet and the backfill service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import dns.message
import dns.rcode
import dns.rrset
import pytest
import pytest_asyncio
from aiohttp import web
from backfill_support import run_backfill_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support import free_port

from backfill.handle_rules import (
    HandleSettings,
    claimed_handle,
    did_from_txt,
    did_from_well_known,
    parse_overrides,
    resolvable,
)
from backfill.handles import (
    CLOCK_MARGIN_S,
    HANDLE_STORE,
    WELL_KNOWN_MAX_BYTES,
    DnsTxt,
    HandleMetrics,
    HandleResolver,
    HandleVerifier,
    pool_conn,
)
from backfill.hosts import HostClient
from firehose.envparse import ConfigError
from firehose.model import Batch, IdentityEvent
from firehose.storage.writer import apply_batch

ALICE = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
BOB = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"


# -- pure rules --------------------------------------------------------------------------


def test_claimed_handle_is_the_first_valid_at_entry_lower_cased() -> None:
    assert claimed_handle(["https://x.com", "at://Alice.Example.COM"]) == (
        "alice.example.com",
        False,
    )
    assert claimed_handle(["at://not a handle", "at://bob.example.org"]) == (
        "bob.example.org",
        False,
    )
    assert claimed_handle(["at://bad_handle!", 7, "at://.x"]) == (None, True)
    assert claimed_handle(["https://only.web"]) == (None, False)
    assert claimed_handle([]) == (None, False)


def test_reserved_tlds_and_test_only_through_an_override() -> None:
    plain = HandleSettings()
    for handle in ("a.local", "a.onion", "a.arpa", "x.internal", "a.example", "b.invalid"):
        assert not resolvable(handle, plain), handle
    assert not resolvable("alice.devnet.test", plain)
    assert resolvable("alice.bsky.social", plain)
    devnet = HandleSettings(overrides=(("devnet.test", "http://127.0.0.1:1"),))
    assert resolvable("alice.devnet.test", devnet)
    assert not resolvable("alice.other.test", devnet)
    assert devnet.override_for("devnet.test") is None  # the suffix itself is no handle below it


def test_dns_txt_needs_exactly_one_did_record() -> None:
    assert did_from_txt([[b"did=", ALICE.encode()]]) == ALICE
    assert did_from_txt([[b"v=spf1"], [b"did=" + ALICE.encode()]]) == ALICE
    assert did_from_txt([[b"did=" + ALICE.encode()], [b"did=" + BOB.encode()]]) is None
    assert did_from_txt([[b"did=not-a-did"]]) is None
    assert did_from_txt([[b"\xff\xfe"]]) is None
    assert did_from_txt([]) is None


def test_well_known_body_is_one_did_trimmed() -> None:
    assert did_from_well_known(f"  {ALICE}\n".encode()) == ALICE
    assert did_from_well_known(f"{ALICE}\nextra".encode()) == ALICE  # first line (reference)
    assert did_from_well_known(b"<html>hello</html>") is None
    assert did_from_well_known(b"") is None
    assert did_from_well_known(b"\xff" + ALICE.encode()) is None


def test_overrides_accept_only_test_suffixes_and_urls() -> None:
    assert parse_overrides("devnet.test=http://127.0.0.1:2583/, a.b.test=https://h") == (
        ("devnet.test", "http://127.0.0.1:2583"),
        ("a.b.test", "https://h"),
    )
    for bad in ("bsky.social=http://127.0.0.1:1", "devnet.test", "x.test=ftp://h", "x.test=h"):
        with pytest.raises(ValueError):
            parse_overrides(bad)
    with pytest.raises(ConfigError, match="HANDLE_RESOLUTION_OVERRIDES"):
        HandleSettings.from_env({"HANDLE_RESOLUTION_OVERRIDES": "example.com=http://h"})
    with pytest.raises(ConfigError, match="BACKFILL_VERIFY_HANDLES"):
        HandleSettings.from_env({"BACKFILL_VERIFY_HANDLES": "maybe"})
    assert not HandleSettings.from_env({"BACKFILL_VERIFY_HANDLES": "false"}).enabled


# -- servers -------------------------------------------------------------------------------


@dataclass
class WellKnown:
    """A web server answering /.well-known/atproto-did by Host header."""

    bodies: dict[str, bytes]
    requests: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        host = (request.host or "").rsplit(":", 1)[0]
        self.requests.append(host)
        body = self.bodies.get(host)
        if body is None:
            return web.Response(status=404, text="no")
        return web.Response(body=body, content_type="text/plain")


@pytest_asyncio.fixture
async def web_server() -> AsyncIterator[tuple[WellKnown, str]]:
    server = WellKnown({})
    app = web.Application()
    app.router.add_get("/.well-known/atproto-did", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class DnsServer(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback: TXT answers from `records`, NXDOMAIN for
    other names, and no answer at all for names in `silent` (a timeout)."""

    def __init__(self, records: dict[str, list[str]], silent: set[str]) -> None:
        self.records, self.silent = records, silent
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        qname = query.question[0].name
        name = qname.to_text().rstrip(".")
        self.queries.append(name)
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        if name in self.records:
            texts = [f'"{t}"' for t in self.records[name]]
            response.answer.append(dns.rrset.from_text(qname, 60, "IN", "TXT", *texts))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[tuple[DnsServer, int]]:
    server = DnsServer({}, set())
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    try:
        yield server, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


@dataclass
class Rig:
    verifier: HandleVerifier
    metrics: HandleMetrics
    registry: CollectorRegistry

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def result(self, result: str) -> float:
        return self.count("backfill_handle_checks_total", result=result)


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def make_rig(
    pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    settings: HandleSettings,
    *,
    dns_port: int | None = None,
    allow_private: bool = True,
    **kw: Any,
) -> Rig:
    def http() -> HostClient:
        return HostClient(
            session, allow_private=allow_private, max_response_bytes=WELL_KNOWN_MAX_BYTES
        )

    dns_txt = DnsTxt(["127.0.0.1"], dns_port or free_port(), timeout_s=1.0)
    registry = CollectorRegistry()
    metrics = HandleMetrics.create(registry)
    resolver = HandleResolver(http, settings, dns_txt)
    verifier = HandleVerifier(resolver, lambda: pool_conn(pool), metrics, **kw)
    return Rig(verifier, metrics, registry)


async def handle_of(conn: asyncpg.Connection, did: str) -> str | None:
    value: str | None = await conn.fetchval("SELECT handle FROM actors WHERE did = $1", did)
    return value


# -- HTTPS well-known (through an override to loopback) -----------------------------------


async def test_verified_mismatched_oversized_and_missing_answers(
    web_server: tuple[WellKnown, str],
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    server, base = web_server
    server.bodies = {
        "alice.dev.test": f"{ALICE}\n".encode(),
        "liar.dev.test": BOB.encode(),
        "huge.dev.test": ALICE.encode() + b" " * WELL_KNOWN_MAX_BYTES,
        "junk.dev.test": b"<html>parked domain</html>",
    }
    rig = make_rig(pool, session, HandleSettings(overrides=(("dev.test", base),)))
    v, now = rig.verifier, time.time()
    assert await v.verify(ALICE, "alice.dev.test", now) == "verified"
    assert await v.verify(ALICE, "liar.dev.test", now) == "mismatch"
    assert await v.verify(ALICE, "huge.dev.test", now) == "too_large"
    assert await v.verify(ALICE, "junk.dev.test", now) == "bad_syntax"
    assert await v.verify(BOB, "nobody.dev.test", now) == "not_found"
    assert await v.verify(BOB, "bob.elsewhere.test", now) == "bad_syntax"  # .test, no override
    assert await handle_of(conn, ALICE) == "alice.dev.test"
    assert await handle_of(conn, BOB) is None
    for result in ("verified", "mismatch", "too_large", "not_found"):
        assert rig.result(result) == 1, result
    assert rig.result("bad_syntax") == 2
    assert rig.count("backfill_handles_stored_total", outcome="stored") == 1
    # The DNS server was never asked: an override's handles are checked on the web only.
    assert "bob.elsewhere.test" not in server.requests


async def test_unreachable_host_and_private_address_refused(
    pool: asyncpg.Pool, conn: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rig = make_rig(pool, session, HandleSettings(overrides=(("dev.test", closed),)))
    assert await rig.verifier.verify(ALICE, "alice.dev.test", time.time()) == "connection"
    # A real-network run (private addresses not allowed) refuses loopback even when an
    # override points there.
    strict = make_rig(
        pool, session, HandleSettings(overrides=(("dev.test", closed),)), allow_private=False
    )
    assert await strict.verifier.verify(ALICE, "alice.dev.test", time.time()) == (
        "forbidden_address"
    )
    assert await handle_of(conn, ALICE) is None
    assert rig.result("connection") == 1 and strict.result("forbidden_address") == 1


async def test_cache_hit_asks_the_host_once(
    web_server: tuple[WellKnown, str],
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    server, base = web_server
    server.bodies = {"alice.dev.test": ALICE.encode()}
    rig = make_rig(pool, session, HandleSettings(overrides=(("dev.test", base),)))
    for _ in range(3):
        assert await rig.verifier.verify(ALICE, "alice.dev.test", time.time()) == "verified"
    assert server.requests == ["alice.dev.test"]
    assert rig.count("backfill_handle_cache_hits_total") == 2
    assert rig.result("verified") == 3


async def test_the_queue_is_bounded_and_worked_in_the_background(
    web_server: tuple[WellKnown, str],
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    server, base = web_server
    server.bodies = {"alice.dev.test": ALICE.encode(), "bob.dev.test": BOB.encode()}
    rig = make_rig(pool, session, HandleSettings(overrides=(("dev.test", base),)), queue_max=1)

    @dataclass
    class Ident:
        did: str
        also_known_as: tuple[str, ...]

    rig.verifier.offer(Ident(ALICE, ("at://Alice.dev.test",)), time.time())
    rig.verifier.offer(Ident(ALICE, ("at://alice.dev.test",)), time.time())  # queued already
    rig.verifier.offer(Ident(BOB, ("at://bob.dev.test",)), time.time())  # queue full
    rig.verifier.offer(Ident(BOB, ("at://bad_handle!",)), time.time())
    rig.verifier.offer(Ident(BOB, ("https://no.handle",)), time.time())
    assert rig.result("dropped") == 1 and rig.result("bad_syntax") == 1
    halt, stop = asyncio.Event(), asyncio.Event()
    halt.set()  # the job is done: the queue is still worked off before run returns
    await asyncio.wait_for(rig.verifier.run(halt, stop), 60)
    assert await handle_of(conn, ALICE) == "alice.dev.test"
    assert await handle_of(conn, BOB) is None
    assert rig.count("backfill_handle_queue") == 0


# -- DNS TXT ---------------------------------------------------------------------------------


async def test_dns_txt_verifies_and_decides(
    dns_server: tuple[DnsServer, int],
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    server, port = dns_server
    server.records = {
        "_atproto.alice.dns.social": ["v=spf1 -all", f"did={ALICE}"],
        "_atproto.liar.dns.social": [f"did={BOB}"],
    }
    server.silent = {"_atproto.slow.dns.social"}
    rig = make_rig(pool, session, HandleSettings(), dns_port=port)
    assert await rig.verifier.verify(ALICE, "alice.dns.social", time.time()) == "verified"
    assert await rig.verifier.verify(ALICE, "liar.dns.social", time.time()) == "mismatch"
    assert await handle_of(conn, ALICE) == "alice.dns.social"
    # The resolver itself: NXDOMAIN is not_found, silence is a timeout.
    dns_txt = DnsTxt(["127.0.0.1"], port, timeout_s=1.0)
    assert (await dns_txt.lookup("nobody.dns.social")).reason == "not_found"
    assert (await dns_txt.lookup("slow.dns.social")).reason == "timeout"
    assert "_atproto.alice.dns.social" in server.queries


# -- convergence with #identity ------------------------------------------------------------


async def identity(conn: asyncpg.Connection, did: str, handle: str, seq: int) -> None:
    await apply_batch(conn, Batch(identities=[IdentityEvent(seq, did, None, handle)]))


async def test_a_newer_identity_handle_is_never_overwritten_in_either_order(
    web_server: tuple[WellKnown, str],
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    server, base = web_server
    server.bodies = {"old.dev.test": ALICE.encode(), "older.dev.test": BOB.encode()}
    rig = make_rig(pool, session, HandleSettings(overrides=(("dev.test", base),)))
    fetched = time.time()  # the DID documents were fetched now...
    # Order 1: #identity applied after the fetch, then the backfill's verified handle.
    await identity(conn, ALICE, "new.dev.test", 1)
    assert await rig.verifier.verify(ALICE, "old.dev.test", fetched) == "verified"
    assert await handle_of(conn, ALICE) == "new.dev.test"
    assert rig.count("backfill_handles_stored_total", outcome="kept_newer") == 1
    # Order 2: the backfill's handle first, then the #identity event: the event wins.
    assert await rig.verifier.verify(BOB, "older.dev.test", fetched) == "verified"
    assert await handle_of(conn, BOB) == "older.dev.test"
    await identity(conn, BOB, "new-bob.dev.test", 2)
    assert await handle_of(conn, BOB) == "new-bob.dev.test"
    # A DID document fetched (well) after the #identity event was applied is newer: it wins.
    later = time.time() + 2 * CLOCK_MARGIN_S
    assert await rig.verifier.verify(BOB, "older.dev.test", later) == "verified"
    assert await handle_of(conn, BOB) == "older.dev.test"
    # A handle of unknown age (stored before sql/007) is kept.
    await conn.execute("UPDATE actors SET handle_at = NULL WHERE did = $1", ALICE)
    assert await rig.verifier.verify(ALICE, "old.dev.test", later + 100) == "verified"
    assert await handle_of(conn, ALICE) == "new.dev.test"
    # A deleted account gets no handle.
    await conn.execute("UPDATE actors SET status = 'deleted', handle = NULL WHERE did = $1", BOB)
    assert await rig.verifier.verify(BOB, "older.dev.test", later + 100) == "verified"
    assert await handle_of(conn, BOB) is None


# -- end to end: the backfill service against the devnet ------------------------------------


@pytest.mark.slow
async def test_backfill_stores_the_devnet_handles_verified(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """`firehose run --devnet`'s settings: loopback allowed for the devnet's own ports only,
    devnet handles checked at a devnet PDS host's well-known answer."""
    from firehose.cli import devnet_worker_settings
    from firehose.devnet.relay import DevnetConfig, DevnetRelay
    from firehose.settings import Settings

    env = {"BACKFILL_DAYS": "-1", "BACKFILL_PROFILE": "unthrottled", "BACKFILL_USE_IDLE": "false"}
    config = DevnetConfig(seed=3, accounts=12, events=400, pds_hosts=2, repo_accounts=3)
    async with DevnetRelay(config) as relay:
        settings = devnet_worker_settings(Settings.from_env(env), relay).backfill
        assert not settings.allow_private_network
        assert [s for s, _ in settings.handles.overrides] == ["devnet.test"]
        registry = CollectorRegistry()
        await run_backfill_service(relay, db_dsn, settings, registry=registry)
        truth = relay.truth()
    backfilled = {r["did"] for r in await conn.fetch("SELECT DISTINCT did FROM backfill_repos")}
    rows = await conn.fetch("SELECT did, handle FROM actors WHERE did = ANY($1)", list(backfilled))
    got = {r["did"]: r["handle"] for r in rows}
    active = {d for d, s in truth["statuses"].items() if s == "active"}
    want = {did: truth["handles"][did] for did in backfilled & active}
    assert want
    assert {did: got.get(did) for did in want} == want
    verified = registry.get_sample_value("backfill_handle_checks_total", {"result": "verified"})
    assert verified == len(want)


# -- property: any interleaving of live #identity and backfill observations converges -------


@st.composite
def handle_histories(draw: st.DrawFn) -> list[str]:
    """A sequence of operations on one account: "change" (its handle changes, the relay emits
    an #identity), "apply" (the live stream applies the oldest pending event), "fetch" (the
    backfill fetches the DID document: the current handle, at this moment), "write" (the
    backfill stores one of its fetched, verified handles, in any order)."""
    return draw(st.lists(st.sampled_from(["change", "apply", "fetch", "write"]), max_size=14))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=handle_histories(), picks=st.randoms(use_true_random=False))
async def test_any_interleaving_converges_to_the_current_handle(
    conn: asyncpg.Connection, ops: list[str], picks: Any
) -> None:
    await conn.execute("DELETE FROM actors WHERE did = $1", ALICE)
    current = "h0.example.com"
    live: list[str] = [current]  # the sign-up's #identity, not applied yet
    fetched: list[tuple[str, datetime]] = []
    seq = 0

    async def apply_one() -> None:
        nonlocal seq
        seq += 1
        await identity(conn, ALICE, live.pop(0), seq)

    async def write_one() -> None:
        handle, at = fetched.pop(picks.randrange(len(fetched)))
        await conn.fetchval(HANDLE_STORE, ALICE, handle, at)  # no clock margin: one clock

    for n, op in enumerate(ops, 1):
        if op == "change":
            current = f"h{n}.example.com"
            live.append(current)
        elif op == "apply" and live:
            await apply_one()
        elif op == "fetch":
            fetched.append((current, await conn.fetchval("SELECT clock_timestamp()")))
        elif op == "write" and fetched:
            await write_one()
    # Everything still in flight arrives, in any order between the two sides.
    while live or fetched:
        if live and (not fetched or picks.random() < 0.5):
            await apply_one()
        else:
            await write_one()
    assert await handle_of(conn, ALICE) == current
