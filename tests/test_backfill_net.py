"""backfill.hosts / relay_http / identity against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from backfill_http import host_client, serve

from backfill.hosts import (
    RATE_LIMIT_DEFAULT_PAUSE_S,
    FetchError,
    host_key,
    is_forbidden_ip,
    parse_reset,
    parse_retry_after,
)
from backfill.identity import IdentityError, IdentityResolver, did_web_url, parse_did_document
from backfill.relay_http import list_repos, parse_list_repos, relay_http_base

IDENTITY_DATA = Path(__file__).parent / "fixtures/indigo/atproto/identity/testdata"
PLC_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


def load_doc(name: str) -> dict[str, Any]:
    return json.loads((IDENTITY_DATA / name).read_text())


# -- pure helpers ------------------------------------------------------------------------


def test_header_parsing() -> None:
    now = 1_700_000_000.0
    assert parse_reset(str(int(now) + 30), now) == 30
    assert parse_reset("30", now) == 30  # delta-seconds (the IETF draft's form)
    assert parse_reset(str(int(now) - 5), now) == 0  # already past
    assert parse_reset("soon", now) is None
    assert parse_reset("-3", now) is None
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0
    assert parse_retry_after("garbage", now) is None
    assert host_key("https://Bsky.Social/xrpc") == "bsky.social:443"
    assert host_key("http://127.0.0.1:2583/x") == "127.0.0.1:2583"


def test_forbidden_addresses() -> None:
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1",
                    "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"):  # fmt: skip
        assert is_forbidden_ip(address), address
    assert not is_forbidden_ip("8.8.8.8")
    assert not is_forbidden_ip("2606:4700::1111")


def test_relay_http_base() -> None:
    assert relay_http_base("wss://bsky.network") == "https://bsky.network"
    assert relay_http_base("wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos") == (
        "https://bsky.network"
    )
    assert relay_http_base("ws://127.0.0.1:2470/") == "http://127.0.0.1:2470"
    assert relay_http_base("ws://user:pw@relay.local:80/x?y=1") == "http://relay.local:80"
    assert relay_http_base("https://relay.example") == "https://relay.example"
    for bad in ("ftp://x", "bsky.network", "wss://"):
        with pytest.raises(ValueError):
            relay_http_base(bad)


# -- HostClient ----------------------------------------------------------------------------


async def test_ratelimit_headers_slow_down_before_429() -> None:
    budget = 5
    log: list[tuple[float, int]] = []

    async def handler(request: web.Request) -> web.Response:
        now = time.time()
        window = math.floor(now)
        used = sum(1 for t, _ in log if math.floor(t) == window)
        log.append((now, 429 if used >= budget else 200))
        headers = {
            "RateLimit-Limit": str(budget),
            "RateLimit-Remaining": str(max(0, budget - used - 1)),
            "RateLimit-Reset": str(window + 1),  # epoch seconds, as the reference PDS
        }
        if used >= budget:
            return web.json_response({"error": "RateLimitExceeded"}, status=429, headers=headers)
        return web.json_response({"ok": True}, headers=headers)

    app = web.Application()
    app.router.add_get("/x", handler)
    async with serve(app) as base, host_client(per_host_concurrency=2) as http:
        await asyncio.gather(*(http.get_json(base + "/x") for _ in range(14)))
        assert [status for _, status in log].count(429) == 0
        assert http.rate_limit_pauses == 0
        assert http.rate_limit_waits > 0
        # 14 requests at 5 per second need at least two resets.
        assert log[-1][0] - log[0][0] >= 1.0


async def test_429_with_retry_after_pauses_the_host() -> None:
    calls: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.json_response({"n": len(calls)})

    app = web.Application()
    app.router.add_get("/x", handler)
    async with serve(app) as base, host_client() as http:
        with pytest.raises(FetchError) as info:
            await http.get_json(base + "/x")
        assert info.value.reason == "rate_limited" and info.value.transient
        assert info.value.retry_after_s == 1
        assert http.rate_limit_pauses == 1
        paused = http.paused_hosts()
        assert list(paused) == [host_key(base)] and 0.5 < paused[host_key(base)] <= 1
        assert await http.get_json(base + "/x") == {"n": 2}
        assert calls[1] - calls[0] >= 0.95
        assert http.paused_hosts() == {}


async def test_429_with_ratelimit_reset_and_without_headers() -> None:
    async def reset_handler(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"RateLimit-Reset": str(int(time.time()) + 30)})

    async def bare_handler(request: web.Request) -> web.Response:
        return web.Response(status=429)

    async def ok_handler(request: web.Request) -> web.Response:
        return web.json_response({})

    apps = []
    for handler in (reset_handler, bare_handler, ok_handler):
        app = web.Application()
        app.router.add_get("/x", handler)
        apps.append(app)
    async with (
        serve(apps[0]) as reset_base,
        serve(apps[1]) as bare_base,
        serve(apps[2]) as ok_base,
        host_client() as http,
    ):
        for base in (reset_base, bare_base):
            with pytest.raises(FetchError) as info:
                await http.get_json(base + "/x")
            assert info.value.reason == "rate_limited"
        paused = http.paused_hosts()
        assert 28 <= paused[host_key(reset_base)] <= 30
        assert paused[host_key(bare_base)] >= RATE_LIMIT_DEFAULT_PAUSE_S - 1
        assert paused[host_key(bare_base)] <= RATE_LIMIT_DEFAULT_PAUSE_S
        # Other hosts are not held up.
        assert await asyncio.wait_for(http.get_json(ok_base + "/x"), 2) == {}
        assert host_key(ok_base) not in http.paused_hosts()
        assert http.known_hosts() == {host_key(b) for b in (reset_base, bare_base, ok_base)}


async def test_status_classification() -> None:
    async def handler(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind == "500":
            return web.Response(status=503, text="down")
        if kind == "redirect":
            raise web.HTTPFound("http://10.0.0.1/")
        if kind == "404":
            return web.Response(status=404, text="nope")
        if kind == "badjson":
            return web.Response(text="{not json")
        return web.json_response({"error": kind, "message": "x"}, status=400)

    app = web.Application()
    app.router.add_get("/{kind}", handler)
    expected = {
        "500": ("server_error", True),
        "RepoNotFound": ("repo_not_found", False),
        "RepoDeactivated": ("repo_deactivated", False),
        "RepoTakendown": ("repo_takendown", False),
        "RepoSuspended": ("repo_suspended", False),
        "InvalidRequest": ("client_error", False),
        "404": ("not_found", False),
        "redirect": ("bad_response", False),
        "badjson": ("bad_response", False),
    }
    async with serve(app) as base, host_client() as http:
        for kind, (reason, transient) in expected.items():
            with pytest.raises(FetchError) as info:
                await http.get_json(f"{base}/{kind}")
            assert (info.value.reason, info.value.transient) == (reason, transient), kind


async def test_connection_refused_is_transient() -> None:
    app = web.Application()
    async with serve(app) as base:
        pass  # closed: nothing listens on that port now
    async with host_client() as http:
        with pytest.raises(FetchError) as info:
            await http.get_json(base + "/x")
        assert info.value.reason == "connection" and info.value.transient


async def test_private_addresses_refused_unless_allowed() -> None:
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/x", handler)
    async with serve(app) as base:
        port = base.rsplit(":", 1)[1]
        async with host_client(allow_private=False) as http:
            for url in (base + "/x", f"http://localhost:{port}/x", "ftp://example.com/x"):
                with pytest.raises(FetchError) as info:
                    await http.get_json(url)
                assert not info.value.transient
                assert info.value.reason in ("forbidden_address", "bad_url"), url
        assert hits == 0
        async with host_client(allow_private=True) as http:
            assert await http.get_json(base + "/x") == {}
        assert hits == 1


async def test_oversized_json_refused() -> None:
    big = json.dumps({"x": "a" * 5000}).encode()

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 100):
            await resp.write(big[i : i + 100])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/sized", sized)
    app.router.add_get("/chunked", chunked)
    async with serve(app) as base, host_client(max_response_bytes=1000) as http:
        for path in ("/sized", "/chunked"):
            with pytest.raises(FetchError) as info:
                await http.get_json(base + path)
            assert info.value.reason == "too_large" and not info.value.transient


# -- listRepos -----------------------------------------------------------------------------


def relay_app(total: int, pages: dict[str, Any] | None = None) -> web.Application:

    dids = [f"did:plc:test{i:020d}" for i in range(total)]

    async def handler(request: web.Request) -> web.Response:
        cursor = request.query.get("cursor")
        if pages is not None:
            return web.Response(
                body=json.dumps(pages[cursor or ""]), content_type="application/json"
            )
        limit = int(request.query["limit"])
        start = int(cursor or 0)
        chunk = dids[start : start + limit]
        body: dict[str, Any] = {
            "repos": [
                {"did": d, "head": "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5v4qmg4ugcg2y3a",
                 "rev": "3lk2aaaaaaa22", "active": True}
                for d in chunk
            ]
        }  # fmt: skip
        if start + limit < total:
            body["cursor"] = str(start + limit)
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.sync.listRepos", handler)
    return app


async def test_list_repos_pagination() -> None:
    async with serve(relay_app(2500)) as base, host_client() as http:
        cursor: str | None = None
        seen: list[str] = []
        pages = 0
        while True:
            page = await list_repos(http, base, cursor)
            pages += 1
            seen += [ref.did for ref in page.repos]
            assert page.invalid == 0
            if page.cursor is None:
                break
            cursor = page.cursor
        assert pages == 3
        assert seen == [f"did:plc:test{i:020d}" for i in range(2500)]


async def test_list_repos_hostile_pages() -> None:
    good = {"did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "rev": "3lk2aaaaaaa22", "head": None}
    pages: dict[str, Any] = {
        "": {
            "cursor": "p2",
            "repos": [
                good,
                {"did": "not a did"},
                {"did": 5},
                "string",
                {"did": "did:plc:x", "active": "yes"},
                {"did": "did:plc:x", "rev": "not-a-tid"},
                {"did": "did:plc:y", "status": "x" * 1000},
                {"did": "did:plc:z", "active": False, "status": "takendown"},
            ],
        },
        "p2": {"cursor": "p2", "repos": [good]},
    }
    async with serve(relay_app(0, pages)) as base, host_client() as http:
        page = await list_repos(http, base, None)
        assert [r.did for r in page.repos] == [good["did"], "did:plc:z"]
        assert page.repos[1].active is False and page.repos[1].status == "takendown"
        assert page.invalid == 6
        assert page.cursor == "p2"
        with pytest.raises(FetchError) as info:
            await list_repos(http, base, "p2")  # the cursor does not advance
        assert info.value.reason == "bad_response"
    for doc in ([], {"repos": {}}, {"repos": [], "cursor": 5}, {"repos": [], "cursor": "x" * 5000}):
        with pytest.raises(FetchError):
            parse_list_repos(doc, None)
    assert parse_list_repos({"repos": [], "cursor": "next"}, None).cursor is None


# -- identity ------------------------------------------------------------------------------


def test_parse_did_documents() -> None:
    ident = parse_did_document(PLC_DID, load_doc("did_plc_doc.json"))
    assert ident.pds == "https://bsky.social"
    assert ident.handle == "atproto.com"
    assert ident.signing_key == "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"
    legacy = parse_did_document(PLC_DID, load_doc("did_plc_doc_legacy.json"))
    assert legacy.pds == "https://bsky.social" and legacy.signing_key is not None
    web_doc = load_doc("did_web_doc.json")
    with pytest.raises(IdentityError) as info:
        parse_did_document("did:web:discover.bsky.social", web_doc)
    assert info.value.reason == "no_pds"  # a feed generator, no #atproto_pds
    with pytest.raises(IdentityError) as info:
        parse_did_document("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", load_doc("did_plc_doc.json"))
    assert info.value.reason == "bad_document"  # id mismatch
    doc = load_doc("did_plc_doc.json")
    doc["service"][0]["type"] = "SomethingElse"
    with pytest.raises(IdentityError) as info:
        parse_did_document(PLC_DID, doc)
    assert info.value.reason == "no_pds"
    doc["service"] = [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                       "serviceEndpoint": "javascript:alert(1)"}]  # fmt: skip
    with pytest.raises(IdentityError):
        parse_did_document(PLC_DID, doc)
    for bad in (None, [], "x", {"id": PLC_DID, "service": "nope"}):
        with pytest.raises(IdentityError):
            parse_did_document(PLC_DID, bad)


def test_did_web_url() -> None:
    assert did_web_url("did:web:example.com", False) == "https://example.com/.well-known/did.json"
    assert did_web_url("did:web:127.0.0.1%3A8080", True) == (
        "http://127.0.0.1:8080/.well-known/did.json"
    )
    assert did_web_url("did:web:127.0.0.1%3A8080", False).startswith("https://")
    with pytest.raises(IdentityError):
        did_web_url("did:web:example.com:user:alice", True)


async def test_resolve_plc_with_cache_and_ttl() -> None:
    requests: list[str] = []
    docs = {PLC_DID: load_doc("did_plc_doc.json")}

    async def handler(request: web.Request) -> web.Response:
        did = request.match_info["did"]
        requests.append(did)
        if did == "did:plc:badjsonbadjsonbadjsonbad":
            return web.Response(text="<html>")
        if did not in docs:
            return web.json_response({"message": "DID not registered"}, status=404)
        return web.json_response(docs[did])

    app = web.Application()
    app.router.add_get("/{did}", handler)
    async with serve(app) as plc, host_client() as http:
        resolver = IdentityResolver(http, plc + "/", ttl_s=0.3, max_entries=10)
        ident = await resolver.resolve(PLC_DID)
        assert ident.pds == "https://bsky.social" and ident.handle == "atproto.com"
        assert await resolver.resolve(PLC_DID) is ident
        assert requests == [PLC_DID]
        await asyncio.sleep(0.35)
        await resolver.resolve(PLC_DID)  # expired: fetched again
        assert requests == [PLC_DID, PLC_DID]
        resolver.invalidate(PLC_DID)
        await resolver.resolve(PLC_DID)
        assert len(requests) == 3
        for did, reason in (
            ("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "not_found"),
            ("did:plc:badjsonbadjsonbadjsonbad", "bad_document"),
            ("did:plc:short", "bad_did"),
            ("did:key:zQ3sh", "bad_did"),
            ("nonsense", "bad_did"),
        ):
            with pytest.raises(IdentityError) as info:
                await resolver.resolve(did)
            assert info.value.reason == reason, did
        # Bounded size: the least recently used entries go first.
        small = IdentityResolver(http, plc, max_entries=1)
        for i in range(3):
            did = f"did:plc:{chr(ord('a') + i) * 24}"
            docs[did] = {**load_doc("did_plc_doc.json"), "id": did}
            await small.resolve(did)
        assert len(small) == 1


async def test_resolve_did_web_loopback() -> None:
    holder: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        doc = load_doc("did_plc_doc.json")
        doc["id"] = holder["did"]
        doc["service"][0]["serviceEndpoint"] = "http://127.0.0.1:2583/"
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/.well-known/did.json", handler)
    async with serve(app) as base:
        did = "did:web:" + base.removeprefix("http://").replace(":", "%3A")
        holder["did"] = did
        async with host_client(allow_private=True) as http:
            ident = await IdentityResolver(http, "http://unused.invalid").resolve(did)
            assert ident.pds == "http://127.0.0.1:2583"
            holder["did"] = "did:web:someone.else"
            with pytest.raises(IdentityError) as info:
                await IdentityResolver(http, "http://unused.invalid").resolve(did)
            assert info.value.reason == "bad_document"
        async with host_client(allow_private=False) as http:
            with pytest.raises(IdentityError) as info:
                await IdentityResolver(http, "http://unused.invalid").resolve(did)
            assert info.value.reason == "forbidden_address"
