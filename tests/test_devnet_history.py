"""The devnet's history half over real HTTP: history clock, getRepo CARs, listRepos, PLC,
prebuilt repos, served CAR files, did:web and the truth file's backfill keys.

Everything a backfill relies on is checked from the bytes with code independent of the
devnet's encoder: block hashes with hashlib, blocks decoded with libipld, the commit's
`data` against an MST rebuilt from the records, the signature with the PLC document's key.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import libipld
import pytest_asyncio
from test_devnet_generator import read_car

from firehose.devnet import dagcbor
from firehose.devnet.clock import DAY_US, TID_RE, parse_rfc3339_us
from firehose.devnet.generator import Generator
from firehose.devnet.keys import parse_did_key, verify
from firehose.devnet.mst import build_mst
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.devnet.tid import tid_micros

FIXTURES = Path(__file__).parent / "fixtures"
EXTRA_CARS = (
    FIXTURES / "indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car",
    FIXTURES / "rsky/rsky-repo/resources/test/valid_repo.car",
    FIXTURES / "arroba/arroba/tests/snarfed2.car",
)
NOW_US = 1_760_000_000_000_000  # 2025-10-09T08:53:20Z
HISTORY_DAYS, EVENTS, HISTORY_EVENTS = 120, 1500, 1000
CONFIG = DevnetConfig(
    seed=21,
    accounts=25,
    events=EVENTS,
    now_us=NOW_US,
    history_days=HISTORY_DAYS,
    history_events=HISTORY_EVENTS,
    pds_hosts=3,
    repo_accounts=12,
    repo_records=40,
    extra_cars=tuple(str(path) for path in EXTRA_CARS),
    did_web_records=7,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def relay() -> AsyncIterator[DevnetRelay]:
    async with DevnetRelay(CONFIG) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def http_base(relay: DevnetRelay) -> str:
    return relay.url.replace("ws://", "http://")  # what the backfill derives from RELAY_URL


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def list_all(http: aiohttp.ClientSession, base: str, limit: int) -> list[dict[str, Any]]:
    repos: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = await get_json(http, base + "/xrpc/com.atproto.sync.listRepos" + query)
        assert status == 200 and len(body["repos"]) <= limit
        repos += body["repos"]
        cursor = body.get("cursor")
        if cursor is None:
            return repos


def check_car(data: bytes) -> tuple[bytes, dict[bytes, Any]]:
    """Every block's sha256 matches its CID; returns (root, decoded blocks)."""
    roots, blocks = read_car(data)
    decoded = {}
    for cid, block in blocks:
        assert cid[:4] == b"\x01\x71\x12\x20" and hashlib.sha256(block).digest() == cid[4:]
        decoded[cid] = libipld.decode_dag_cbor(block)
    assert len(roots) == 1 and roots[0] in decoded
    return roots[0], decoded


# ---- history clock --------------------------------------------------------------------------


def test_history_spans_the_days_before_now_and_revs_increase() -> None:
    generator = Generator(seed=5, accounts=20, now_us=NOW_US, history_days=95, history_events=600)
    last_rev: dict[str, str] = {}
    times = []
    for _ in range(900):
        header, body = libipld.decode_dag_cbor_multi(generator.next_frame())
        moment = parse_rfc3339_us(body["time"])
        assert moment is not None
        times.append(moment)
        if header["t"] != "#commit":
            continue
        rev = body["rev"]
        assert rev > last_rev.get(body["repo"], "") and tid_micros(rev) == generator.now_us
        last_rev[body["repo"]] = rev
        for op in body["ops"]:
            rkey = op["path"].split("/", 1)[1]
            if op["action"] == "create" and TID_RE.match(rkey):
                assert tid_micros(rkey) <= generator.now_us  # recreates reuse older keys
    history, live = times[:600], times[600:]
    assert history == sorted(history) and live == sorted(live)
    assert NOW_US - 95 * DAY_US <= history[0] < NOW_US - 94 * DAY_US
    assert history[-1] - history[0] >= 90 * DAY_US and history[-1] < NOW_US
    assert live[0] >= NOW_US and live[-1] <= NOW_US + 300 * 40_000
    truth = generator.truth()
    assert truth["now_us"] == NOW_US


def test_history_is_deterministic_and_default_mode_unchanged() -> None:
    def frames(**kwargs: Any) -> list[bytes]:
        return Generator(seed=3, accounts=10, **kwargs).frames(300)

    assert frames(now_us=NOW_US, history_days=100, history_events=200) == frames(
        now_us=NOW_US, history_days=100, history_events=200
    )
    # Without history the clock ignores `now_us`: the same frames as before the feature.
    assert frames() == frames(now_us=NOW_US)


# ---- relay and PDS listRepos, PLC ---------------------------------------------------------


async def test_list_repos_pages_every_repo_once(
    relay: DevnetRelay, http: aiohttp.ClientSession
) -> None:
    truth = relay.truth()
    listed = await list_all(http, http_base(relay), limit=7)
    dids = [repo["did"] for repo in listed]
    assert len(dids) == len(set(dids)) == len(truth["hosts"]) == len(truth["statuses"])
    assert dids == [repo["did"] for repo in await list_all(http, http_base(relay), limit=1000)]
    for repo in listed:
        status = truth["statuses"][repo["did"]]
        assert repo["active"] == (status == "active") and repo.get("status", "active") == status
    per_host: dict[str, list[str]] = defaultdict(list)
    for index, url in enumerate(relay.network.pds_urls):
        for repo in await list_all(http, url, limit=3):
            per_host[url].append(repo["did"])
            assert truth["hosts"][repo["did"]] == url, index
    assert sorted(d for ds in per_host.values() for d in ds) == sorted(dids)
    assert len(per_host) == 3
    status, body = await get_json(
        http, http_base(relay) + "/xrpc/com.atproto.sync.listRepos?limit=1001"
    )
    assert status == 400 and body["error"] == "InvalidRequest"
    async with http.get(http_base(relay) + "/xrpc/other") as response:
        assert response.status == 404


async def test_plc_documents(relay: DevnetRelay, http: aiohttp.ClientSession) -> None:
    truth = relay.truth()
    plc = relay.network.plc_url
    for did, endpoint in truth["hosts"].items():
        if not did.startswith("did:plc:"):
            continue
        status, doc = await get_json(http, f"{plc}/{did}")
        assert status == 200 and doc["id"] == did
        assert doc["alsoKnownAs"] == [f"at://{truth['handles'][did]}"]
        (service,) = doc["service"]
        assert service == {
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": endpoint,
        }
    status, body = await get_json(http, f"{plc}/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    assert status == 404 and "message" in body


# ---- getRepo --------------------------------------------------------------------------------


async def test_get_repo_cars_verify(relay: DevnetRelay, http: aiohttp.ClientSession) -> None:
    truth = relay.truth()
    served_cars = {path.read_bytes() for path in EXTRA_CARS}
    by_did: dict[str, dict[str, str]] = defaultdict(dict)
    for uri, cid in truth["records"].items():
        did, path = uri.removeprefix("at://").split("/", 1)
        by_did[did][path] = cid
    checked = 0
    for repo in await list_all(http, http_base(relay), limit=100):
        did = repo["did"]
        if not repo["active"]:
            continue
        if did.startswith("did:web:"):
            host = "http://" + did.removeprefix("did:web:").replace("%3A", ":")
            status, doc = await get_json(http, host + "/.well-known/did.json")
        else:
            status, doc = await get_json(http, f"{relay.network.plc_url}/{did}")
        assert status == 200
        endpoint = doc["service"][0]["serviceEndpoint"]
        async with http.get(
            f"{endpoint}/xrpc/com.atproto.sync.getRepo", params={"did": did}
        ) as response:
            assert response.status == 200
            assert response.content_type == "application/vnd.ipld.car"
            data = await response.read()
        root, blocks = check_car(data)
        assert dagcbor.cid_str(root) == repo["head"]
        commit = blocks[root]
        assert commit["did"] == did and commit["rev"] == repo["rev"] and commit["version"] == 3
        status, latest = await get_json(
            http, f"{endpoint}/xrpc/com.atproto.sync.getLatestCommit?" + urlencode({"did": did})
        )
        assert latest == {"cid": repo["head"], "rev": repo["rev"]}
        if data in served_cars:  # a real repo, verbatim: its key is not ours to check
            served_cars.discard(data)
            continue
        records = {path: dagcbor.cid_from_str(cid) for path, cid in by_did[did].items()}
        root_cid, _ = build_mst(records.items())
        assert commit["data"] == root_cid
        assert all(cid in blocks for cid in records.values())
        unsigned = {k: v for k, v in commit.items() if k != "sig"}
        _, key = parse_did_key(doc["verificationMethod"][0]["publicKeyMultibase"])
        assert verify(
            key, dagcbor.encode({**unsigned, "data": dagcbor.link(commit["data"])}), commit["sig"]
        )
        checked += 1
    assert not served_cars, "every --extra-car is served verbatim"
    assert checked >= CONFIG.repo_accounts + 1


async def test_inactive_and_unknown_repos_are_xrpc_errors(
    relay: DevnetRelay, http: aiohttp.ClientSession
) -> None:
    truth = relay.truth()
    expected = {
        "deactivated": "RepoDeactivated",
        "takendown": "RepoTakendown",
        "suspended": "RepoSuspended",
        "deleted": "RepoNotFound",
    }
    seen = set()
    for did, status in truth["statuses"].items():
        if status == "active":
            continue
        url = f"{truth['hosts'][did]}/xrpc/com.atproto.sync.getRepo?" + urlencode({"did": did})
        code, body = await get_json(http, url)
        assert code == 400 and body["error"] == expected[status] and body["message"]
        seen.add(status)
    assert seen, "the seed should produce some inactive accounts"
    pds = relay.network.pds_urls[0]
    code, body = await get_json(http, f"{pds}/xrpc/com.atproto.sync.getRepo?did=did:plc:nobody")
    assert code == 400 and body["error"] == "RepoNotFound"
    code, body = await get_json(http, f"{pds}/xrpc/com.atproto.sync.getRepo")
    assert code == 400 and body["error"] == "InvalidRequest"


# ---- the truth file's backfill keys ---------------------------------------------------------


async def test_record_times_follow_the_backfill_rule(
    relay: DevnetRelay, http: aiohttp.ClientSession
) -> None:
    truth = relay.truth()
    assert truth["now_us"] == NOW_US
    assert set(truth["record_times"]) == set(truth["records"])
    values: dict[str, Any] = {}
    for did, endpoint in truth["hosts"].items():
        if truth["statuses"][did] != "active":
            continue
        async with http.get(
            f"{endpoint}/xrpc/com.atproto.sync.getRepo", params={"did": did}
        ) as response:
            _, blocks = check_car(await response.read())
        for uri, cid in truth["records"].items():
            if uri.startswith(f"at://{did}/"):
                values[uri] = blocks.get(dagcbor.cid_from_str(cid))
    # com.atproto.repo.strongRef's cid is a string (format cid), never a link: the prebuilt
    # accounts' likes and reposts once carried it as a link, which no real PDS writes.
    refs = [
        (uri, value["subject"])
        for uri, value in values.items()
        if value and value.get("$type") in ("app.bsky.feed.like", "app.bsky.feed.repost")
    ]
    bulk = {a.did for a in relay.generator.prebuilt if a.handle.startswith("bulk-")}
    assert any(uri.split("/")[2] in bulk for uri, _ in refs)  # the prebuilt ones are there
    assert all(isinstance(ref["cid"], str) and ref["cid"].startswith("bafyrei") for _, ref in refs)
    nulls = 0
    for uri, moment in truth["record_times"].items():
        rkey = uri.rsplit("/", 1)[1]
        if re.fullmatch(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}", rkey):
            assert moment == tid_micros(rkey), uri
            continue
        if uri not in values:
            continue  # an inactive account: getRepo refuses it
        if uri.endswith("/app.bsky.actor.profile/self"):
            assert moment is None, uri  # current state: the backfill keeps it whatever its date
            nulls += 1
            continue
        created = (values[uri] or {}).get("createdAt")
        assert moment == (parse_rfc3339_us(created) if isinstance(created, str) else None), uri
        nulls += moment is None
    assert nulls >= 1  # bnewbold's profile has no createdAt
    moments = [t for t in truth["record_times"].values() if t is not None]
    assert any(t >= NOW_US for t in moments)  # created by live events
    assert any(t < NOW_US - 90 * DAY_US for t in moments)  # early history


async def test_prebuilt_and_served_records_are_in_the_truth(relay: DevnetRelay) -> None:
    truth = relay.truth()
    prebuilt = [a for a in relay.generator.prebuilt if a.handle.startswith("bulk-")]
    assert len(prebuilt) == CONFIG.repo_accounts
    for account in prebuilt:
        uris = [u for u in truth["records"] if u.startswith(f"at://{account.did}/")]
        assert len(uris) == CONFIG.repo_records + 1  # + profile
        times = [
            truth["record_times"][u] for u in uris if not u.endswith("/app.bsky.actor.profile/self")
        ]
        assert len(times) == CONFIG.repo_records  # the profile's moment is None: current state
        low = NOW_US - HISTORY_DAYS * DAY_US
        assert all(t is not None and low <= t < NOW_US for t in times)
    for car in relay.network.cars:
        assert car.truth_records().items() <= truth["records"].items()
        assert truth["hosts"][car.did] in relay.network.pds_urls
    web = [d for d in truth["hosts"] if d.startswith("did:web:127.0.0.1%3A")]
    assert len(web) == 1


async def test_cli_prints_every_endpoint(tmp_path: Path) -> None:
    import asyncio

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firehose.devnet",
        "--accounts=5",
        "--events=50",
        "--history-days=91",
        "--pds-hosts=2",
        "--now=2025-06-01T00:00:00Z",
        f"--extra-car={EXTRA_CARS[1]}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        lines = [(await asyncio.wait_for(process.stdout.readline(), 60)).decode() for _ in range(4)]
        assert re.search(r"devnet relay listening on ws://127\.0\.0\.1:\d+", lines[0])
        assert re.search(r"devnet PLC directory on http://127\.0\.0\.1:\d+", lines[1])
        pds = [
            re.search(r"devnet PDS (\d) on (http://127\.0\.0\.1:\d+)", line) for line in lines[2:]
        ]
        assert [m.group(1) for m in pds if m] == ["0", "1"]
        async with aiohttp.ClientSession() as http:
            url = pds[0].group(2) if pds[0] else ""
            status, body = await get_json(http, url + "/xrpc/com.atproto.sync.listRepos")
            assert status == 200 and body["repos"][0]["did"] == "did:plc:r7fdhqmw3h2cifeakw5hmvy6"
    finally:
        process.terminate()
        await process.wait()
