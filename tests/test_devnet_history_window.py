"""The devnet's history half for window backfills (issue 9), over real HTTP: getRepo?since=
with the reference PDS's semantics, getRecord proofs, listReposByCollection on the relay,
the year history model, the truth's `history` and its helpers, and the fault flags.

CARs are read with the WORKER's decoder (firehose.protocol: CAR reader, MST walk, commit
signature), which shares no code with the devnet's encoder. The per-block first rev is
checked against a from-scratch replay that rebuilds the whole tree at every commit
(`build_mst`), independent of the incremental bookkeeping under test.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import pytest_asyncio

from firehose.devnet import dagcbor
from firehose.devnet.cli import add_arguments, config_from_args
from firehose.devnet.clock import DAY_US, TID_RE, parse_rfc3339_us
from firehose.devnet.keys import SigningKey
from firehose.devnet.model import MODEL_NOTE, build_model_accounts
from firehose.devnet.mst import build_mst
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.devnet.repo import Repo, Write
from firehose.devnet.tid import tid, tid_micros
from firehose.devnet.truth import dormant_dids, since_tid, window_blocks, window_bytes
from firehose.protocol.car import read_car
from firehose.protocol.cbor import decode_record
from firehose.protocol.mst import MissingSubtree, read_commit, walk_mst, walk_mst_partial
from firehose.protocol.signature import parse_multikey, verify_commit

FIXTURES = Path(__file__).parent / "fixtures"
EXTRA_CAR = FIXTURES / "rsky/rsky-repo/resources/test/valid_repo.car"
NOW_US = 1_760_000_000_000_000  # 2025-10-09T08:53:20Z
CUTOFF_US = NOW_US - 30 * DAY_US
MODEL_ACCOUNTS = 120
CONFIG = DevnetConfig(
    seed=9,
    accounts=12,
    events=400,
    now_us=NOW_US,
    history_days=60,
    history_events=300,
    pds_hosts=3,
    repo_accounts=4,
    repo_records=25,
    extra_cars=(str(EXTRA_CAR),),
    history_model="year",
    model_accounts=MODEL_ACCOUNTS,
)
PROFILE = "app.bsky.actor.profile/self"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def relay() -> AsyncIterator[DevnetRelay]:
    async with DevnetRelay(CONFIG) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def truth(relay: DevnetRelay) -> dict[str, Any]:
    return relay.truth()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def relay_base(relay: DevnetRelay) -> str:
    return relay.url.replace("ws://", "http://")


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as response:
        return response.status, await response.read()


async def get_repo(
    http: aiohttp.ClientSession, truth: dict[str, Any], did: str, since: str | None = None
) -> tuple[int, bytes]:
    query = {"did": did} | ({} if since is None else {"since": since})
    return await fetch(
        http, f"{truth['hosts'][did]}/xrpc/com.atproto.sync.getRepo?{urlencode(query)}"
    )


async def get_record(
    http: aiohttp.ClientSession, truth: dict[str, Any], did: str, path: str
) -> tuple[int, bytes]:
    collection, rkey = path.split("/", 1)
    query = urlencode({"did": did, "collection": collection, "rkey": rkey})
    return await fetch(http, f"{truth['hosts'][did]}/xrpc/com.atproto.sync.getRecord?{query}")


def header_bytes(root: bytes) -> int:
    return len(dagcbor.car_header([root]))


def records_of(truth: dict[str, Any], did: str) -> dict[str, str]:
    prefix = f"at://{did}/"
    return {
        uri[len(prefix) :]: cid for uri, cid in truth["records"].items() if uri.startswith(prefix)
    }


def model_dids(truth: dict[str, Any], kind: str | None = None) -> list[str]:
    kinds = truth["model"]["kinds"]
    return sorted(did for did, k in kinds.items() if kind is None or k == kind)


# ---- first revs, against a from-scratch replay --------------------------------------------


def test_block_first_revs_match_a_from_scratch_replay() -> None:
    """After every commit (signed or `advance`d), each current block's first rev is the rev
    of the commit since which it has been present without interruption (the reference
    store's insert-or-keep, then delete-dropped rule), and no other block is tracked."""
    rng = random.Random(5)
    repo = Repo("did:plc:replay", SigningKey.from_seed(5, 0))
    first: dict[bytes, str] = {}
    live: list[str] = []
    moment = NOW_US - 400 * DAY_US
    for step in range(250):
        moment += rng.randrange(1, DAY_US)
        rev = tid(moment, 7)
        writes: list[Write] = []
        touched: set[str] = set()
        for n in range(rng.randint(1, 5)):
            if live and rng.random() < 0.35:
                path = rng.choice(live)
                if path in touched:
                    continue
                touched.add(path)
                if rng.random() < 0.5:
                    live.remove(path)
                    writes.append(Write("delete", path))
                else:  # values repeat on purpose: the same CID under several paths
                    writes.append(Write("update", path, {"$type": "x.y.z", "n": rng.randrange(4)}))
            else:
                path = f"x.y.z/{tid(moment - n - 1, 3)}"
                live.append(path)
                touched.add(path)
                writes.append(Write("create", path, {"$type": "x.y.z", "n": rng.randrange(4)}))
        if step % 4 == 0:
            repo.commit(writes, rev)
        else:
            repo.advance(writes, rev)
            repo.seal()
        root, nodes = build_mst((path, cid) for path, (cid, _) in repo.records.items())
        assert root == repo.data
        assert repo.commit_cid is not None
        current = {repo.commit_cid, *(cid for cid, _ in nodes)}
        current |= {cid for cid, _ in repo.records.values()}
        first = {cid: first.get(cid, rev) for cid in current}
        assert repo.block_revs == first, step


# ---- getRepo?since= -------------------------------------------------------------------------


async def test_listrepos_revs_are_the_latest_commits(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    listed: dict[str, str] = {}
    cursor = ""
    while True:
        url = f"{relay_base(relay)}/xrpc/com.atproto.sync.listRepos?limit=100{cursor}"
        async with http.get(url) as response:
            page = await response.json()
        listed |= {repo["did"]: repo["rev"] for repo in page["repos"] if repo["active"]}
        if "cursor" not in page:
            break
        cursor = f"&cursor={page['cursor']}"
    history = truth["history"]
    assert listed == {did: entry["rev"] for did, entry in history.items()}
    assert set(model_dids(truth)) <= set(listed)
    for did in model_dids(truth)[:10]:  # the rev of the commit getRepo serves
        status, body = await get_repo(http, truth, did)
        assert status == 200 and read_commit(read_car(body)).rev == listed[did]


async def test_since_serves_blocks_first_written_after_since(
    truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    checked = Counter[str]()
    for did in model_dids(truth)[:60]:
        status, whole_body = await get_repo(http, truth, did)
        assert status == 200
        whole = read_car(whole_body)
        commit = read_commit(whole)
        assert dict(walk_mst(commit.data_cid, whole.blocks.get)) == {
            path: dagcbor.cid_from_str(cid) for path, cid in records_of(truth, did).items()
        }
        order = [cid for cid, _ in _sections(whole_body)]
        revs = sorted({row[0] for row in truth["history"][did]["blocks_by_rev"]})
        sinces = [since_tid(CUTOFF_US), since_tid(NOW_US - 200 * DAY_US), revs[len(revs) // 2]]
        previous: set[bytes] | None = None
        for since in sorted(sinces, reverse=True):
            status, body = await get_repo(http, truth, did, since)
            assert status == 200
            car = read_car(body)
            assert car.root_cid == whole.root_cid  # rooted at the current commit
            sections = _sections(body)
            assert len(sections) == window_blocks(truth, since, did)
            assert len(body) - header_bytes(whole.root_cid) == window_bytes(truth, since, [did])
            # Reference order (repoRev DESC): a since download is a prefix of the whole one.
            assert [cid for cid, _ in sections] == order[: len(sections)]
            got = set(car.blocks)
            assert previous is None or previous <= got  # older since: more blocks
            previous = got
            # The commit and the MST root are rewritten by every commit.
            newer = commit.rev is not None and commit.rev > since
            assert (whole.root_cid in got) == newer
            assert (dagcbor.cid_from_str(commit.data_cid) in got) == newer
            for path, cid_text in records_of(truth, did).items():
                rkey = path.split("/", 1)[1]
                cid = dagcbor.cid_from_str(cid_text)
                if not TID_RE.match(rkey) or path.startswith(MODEL_NOTE):
                    continue  # profiles and notes are edited in place
                if rkey > since:  # created by a commit whose rev is after its key
                    assert cid in got, (did, path, since)
                    checked["new"] += 1
                elif tid_micros(rkey) < tid_micros(since) - DAY_US:  # its day's commit is older
                    assert cid not in got, (did, path, since)
                    checked["old"] += 1
            # Every record block present verifies along the partial tree the worker walks.
            for item in walk_mst_partial(commit.data_cid, car.blocks.get):
                if not isinstance(item, MissingSubtree) and item[1] in got:
                    checked["walked"] += 1
    assert min(checked.values()) > 50, checked


def _sections(body: bytes) -> list[tuple[bytes, int]]:
    """(cid, section bytes) of a CAR v1, in order (a minimal reader for the order check)."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = body[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    length, pos = varint(0)
    pos += length
    out = []
    while pos < len(body):
        start = pos
        length, pos = varint(pos)
        out.append((body[pos : pos + 36], pos + length - start))
        pos += length
    return out


async def test_nothing_newer_gives_a_car_without_blocks(
    truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    dormant = dormant_dids(truth, since_tid(CUTOFF_US))
    model_dormant = set(dormant) & set(model_dids(truth))
    assert len(model_dormant) > MODEL_ACCOUNTS // 3
    for did in sorted(model_dormant)[:15] + model_dids(truth, "daily")[:3]:
        for since in (since_tid(CUTOFF_US), truth["history"][did]["rev"], since_tid(NOW_US)):
            if since < truth["history"][did]["rev"]:
                continue
            status, body = await get_repo(http, truth, did, since)
            assert status == 200
            car = read_car(body)
            assert car.blocks == {}
            assert len(body) == header_bytes(car.root_cid)
            # The header names the current commit, which is the whole download's root.
            status, whole = await get_repo(http, truth, did)
            assert read_car(whole).root_cid == car.root_cid
    # A served CAR file: all its blocks count as written at its rev.
    extra = next(did for did in truth["history"] if _is_extra(truth, did))
    rev = truth["history"][extra]["rev"]
    status, body = await get_repo(http, truth, extra, rev)
    assert status == 200 and read_car(body).blocks == {}
    status, body = await get_repo(http, truth, extra, since_tid(0))
    assert body == EXTRA_CAR.read_bytes()


def _is_extra(truth: dict[str, Any], did: str) -> bool:
    return truth["handles"].get(did, "").endswith(".extra.devnet.test")


@pytest.mark.parametrize("since", ["nope", "", "kzzzzzzzzzzzz", "2222222222222222"])
async def test_invalid_since_is_invalid_request(
    truth: dict[str, Any], http: aiohttp.ClientSession, since: str
) -> None:
    did = model_dids(truth)[0]
    status, body = await get_repo(http, truth, did, since)
    assert status == 400 and b'"InvalidRequest"' in body


# ---- getRecord ------------------------------------------------------------------------------


async def test_get_record_proves_presence_and_absence(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    for did in model_dids(truth)[:12] + [d for d in truth["history"] if _is_extra(truth, d)]:
        records = records_of(truth, did)
        status, whole = await get_repo(http, truth, did)
        head = read_car(whole).root_cid
        document = relay.network.directory.did_document(did)
        assert document is not None
        paths = [PROFILE] if PROFILE in records else []
        paths += sorted(records)[:: max(1, len(records) // 3)][:3]
        for path in [*paths, "app.bsky.actor.profile/nope", "zzz.example.none/3jzfcijpj2z2a"]:
            status, body = await get_record(http, truth, did, path)
            assert status == 200, body
            car = read_car(body)  # hash-checked by the worker's reader
            assert car.root_cid == head
            commit = read_commit(car)
            if document["verificationMethod"]:
                key = parse_multikey(document["verificationMethod"][0]["publicKeyMultibase"])
                assert verify_commit(key, car.blocks[car.root_cid])
            found: dict[str, bytes] = {}
            gaps: list[MissingSubtree] = []
            for item in walk_mst_partial(commit.data_cid, car.blocks.get):
                if isinstance(item, MissingSubtree):
                    gaps.append(item)
                else:
                    found[item[0]] = item[1]
            if path in records:
                assert found[path] == dagcbor.cid_from_str(records[path])
                assert found[path] in car.blocks  # the record itself
            else:  # no entry, and no absent subtree whose range could hold one
                assert path not in found
                assert not any(
                    (g.after is None or g.after < path) and (g.before is None or path < g.before)
                    for g in gaps
                )
            # Only the path: the commit, one node per level, the record.
            assert len(car.blocks) <= 2 + 12
    stats = relay.network.stats_json()
    counted = sum(sum(host["get_record"].values()) for host in stats["hosts"])
    assert counted == stats["methods"]["com.atproto.sync.getRecord"]["requests"] >= 12


async def test_get_record_bad_params(truth: dict[str, Any], http: aiohttp.ClientSession) -> None:
    did = model_dids(truth)[0]
    base = truth["hosts"][did] + "/xrpc/com.atproto.sync.getRecord?"
    for query in (
        {"did": did, "collection": "app.bsky.actor.profile"},
        {"did": did, "collection": "not an nsid", "rkey": "self"},
        {"did": did, "collection": "app.bsky.actor.profile", "rkey": "a/b"},
    ):
        status, body = await fetch(http, base + urlencode(query))
        assert status == 400 and b'"InvalidRequest"' in body
    query = {"did": "did:plc:unknownunknownunknownu", "collection": "a.b.c", "rkey": "self"}
    status, body = await fetch(http, base + urlencode(query))
    assert status == 400 and b'"RepoNotFound"' in body


# ---- listReposByCollection ------------------------------------------------------------------


async def list_by_collection(
    http: aiohttp.ClientSession, relay: DevnetRelay, collection: str, limit: int
) -> tuple[list[str], int]:
    dids: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = {"collection": collection, "limit": str(limit)} | (
            {"cursor": cursor} if cursor else {}
        )
        url = f"{relay_base(relay)}/xrpc/com.atproto.sync.listReposByCollection?{urlencode(query)}"
        async with http.get(url) as response:
            assert response.status == 200
            page = await response.json()
        pages += 1
        assert set(page) <= {"repos", "cursor"} and len(page["repos"]) <= limit
        assert all(set(repo) == {"did"} for repo in page["repos"])
        dids += [repo["did"] for repo in page["repos"]]
        cursor = page.get("cursor")
        assert (cursor is not None) == (len(page["repos"]) == limit)  # collectiondir's rule
        if cursor is None:
            return dids, pages


async def test_list_repos_by_collection_pages(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    for collection in (MODEL_NOTE, "app.bsky.actor.profile", "app.bsky.feed.like"):
        holders = {uri.split("/")[2] for uri in truth["records"] if uri.split("/")[3] == collection}
        for limit in (7, 1000):
            dids, pages = await list_by_collection(http, relay, collection, limit)
            assert len(dids) == len(set(dids)) and set(dids) == holders, collection
            assert pages == len(holders) // limit + 1
    notes = await list_by_collection(http, relay, MODEL_NOTE, 1000)
    assert 0 < len(notes[0]) < MODEL_ACCOUNTS // 4  # a custom lexicon: few repos hold it
    assert (await list_by_collection(http, relay, "com.example.nobody", 50))[0] == []
    stats = relay.network.stats_json()["relay_methods"]["com.atproto.sync.listReposByCollection"]
    assert stats["requests"] >= 10 and stats["bytes"] > 0


async def test_list_repos_by_collection_errors_and_limits(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    base = relay_base(relay) + "/xrpc/com.atproto.sync.listReposByCollection?"
    status, body = await fetch(http, base + "collection=not..valid")
    assert status == 400 and b'"BadRequest"' in body
    status, body = await fetch(http, base + "limit=5")
    assert status == 400
    status, body = await fetch(http, base + "collection=app.bsky.actor.profile&cursor=%25%25")
    assert status == 500 and b'"DatabaseError"' in body
    async with http.get(base + "collection=app.bsky.actor.profile&limit=0") as response:
        assert len((await response.json())["repos"]) == 1  # clamped to 1
    async with http.get(base + "collection=app.bsky.actor.profile&limit=x") as response:
        profiles = sum(uri.endswith(f"/{PROFILE}") for uri in truth["records"])
        assert len((await response.json())["repos"]) == min(500, profiles)  # the default


# ---- the model --------------------------------------------------------------------------------


def profile_created_us(relay: DevnetRelay, did: str) -> int:
    """The profile's `createdAt`, decoded from its block by the worker's decoder."""
    _, block = relay.generator.by_did[did].repo.records[PROFILE]
    moment = parse_rfc3339_us(decode_record(block)[0]["createdAt"])
    assert moment is not None
    return moment


def test_model_shape(relay: DevnetRelay, truth: dict[str, Any]) -> None:
    kinds = truth["model"]["kinds"]
    assert len(kinds) == MODEL_ACCOUNTS
    history = truth["history"]
    cutoff = since_tid(CUTOFF_US)
    model = model_dids(truth)
    dormant = [did for did in model if history[did]["rev"] <= cutoff]
    assert sorted(dormant) == model_dids(truth, "dormant")
    assert 0.65 <= len(dormant) / len(model) <= 0.92
    quiet_since = since_tid(NOW_US - 35 * DAY_US)
    assert all(history[did]["rev"] <= quiet_since for did in dormant)  # > a month quiet

    # Model days end at now: the record blocks each day's commit wrote still carry its rev
    # (unless a later commit deleted every one of them).
    def days_ago(did: str) -> set[int]:
        return {(NOW_US - tid_micros(rev)) // DAY_US for rev, _, _ in history[did]["blocks_by_rev"]}

    daily = model_dids(truth, "daily")
    assert daily and all(len(days_ago(did) & set(range(29))) >= 25 for did in daily)
    count = Counter(uri.split("/")[2] for uri in truth["records"])
    heavy = model_dids(truth, "heavy")
    assert heavy and all(count[did] >= 1000 for did in heavy)
    assert max(count[did] for did in model if did not in heavy) < 1000
    note_holders = {uri.split("/")[2] for uri in truth["records"] if f"/{MODEL_NOTE}/" in uri}
    assert 0.03 <= len(note_holders) / len(model) <= 0.2
    # Every account has a profile, for most created before the window.
    created = [profile_created_us(relay, did) for did in model]
    assert sum(moment < CUTOFF_US for moment in created) >= 0.8 * len(model)
    # Deletes over the year, some of records created before the window deleted inside it.
    deletes = truth["model"]["deletes"]
    assert all(uri not in truth["records"] for uri in deletes)
    crossing = [
        uri
        for uri, rev in deletes.items()
        if rev > cutoff and tid_micros(uri.rsplit("/", 1)[1]) < CUTOFF_US
    ]
    assert len(deletes) > 20 and crossing


async def test_profile_updates_inside_the_window_travel_in_a_since_download(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    cutoff = since_tid(CUTOFF_US)
    updated = 0
    for did in model_dids(truth):
        if truth["history"][did]["rev"] <= cutoff:
            continue
        _, body = await get_repo(http, truth, did, cutoff)
        profile = dagcbor.cid_from_str(truth["records"][f"at://{did}/{PROFILE}"])
        if profile in read_car(body).blocks:
            assert profile_created_us(relay, did) < CUTOFF_US  # an update keeps createdAt
            updated += 1
    assert updated >= 1


def test_model_is_deterministic_by_seed() -> None:
    def heads(seed: int) -> list[tuple[str, bytes | None, int]]:
        accounts = build_model_accounts(seed, "http://pds.example", 50, 30, NOW_US)
        return [(a.did, a.repo.commit_cid, len(a.repo.block_revs)) for a in accounts]

    first = heads(3)
    assert heads(3) == first
    assert heads(4) != first


# ---- truth helpers and the bytes the window weighs --------------------------------------------


async def test_window_bytes_matches_what_since_downloads_send(
    relay: DevnetRelay, truth: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    since = since_tid(CUTOFF_US)
    before = relay.network.stats_json()["methods"]["com.atproto.sync.getRepo"]
    received = headers = 0
    for did in sorted(truth["history"]):
        status, body = await get_repo(http, truth, did, since)
        assert status == 200
        received += len(body)
        headers += header_bytes(read_car(body).root_cid)
    assert received - headers == window_bytes(truth, since)
    assert received < window_bytes(truth, None) / 3  # the window is a small part
    after = relay.network.stats_json()["methods"]["com.atproto.sync.getRepo"]
    assert after["requests"] - before["requests"] == len(truth["history"])
    assert after["bytes"] - before["bytes"] == received
    for did in model_dids(truth, "heavy"):  # and car_bytes is the whole download
        status, body = await get_repo(http, truth, did)
        assert len(body) == truth["history"][did]["car_bytes"]


# ---- fault flags ------------------------------------------------------------------------------


@asynccontextmanager
async def small_devnet(**overrides: Any) -> AsyncIterator[tuple[DevnetRelay, dict[str, Any]]]:
    config = DevnetConfig(
        seed=17,
        accounts=5,
        events=60,
        now_us=NOW_US,
        pds_hosts=2,
        history_model="year",
        model_accounts=25,
        **overrides,
    )
    async with DevnetRelay(config) as relay:
        yield relay, relay.truth()


async def test_ignore_since_and_record_not_found(http: aiohttp.ClientSession) -> None:
    async with small_devnet(ignore_since=True, missing_record="not-found") as (_, truth):
        since = since_tid(CUTOFF_US)
        for did in model_dids(truth)[:8]:
            status, whole = await get_repo(http, truth, did)
            assert (await get_repo(http, truth, did, since)) == (200, whole)
            assert len(whole) == truth["history"][did]["car_bytes"]
        did = model_dids(truth)[0]
        status, body = await get_repo(http, truth, did, "not-a-tid")
        assert status == 400  # still the lexicon's parameter check
        status, body = await get_record(http, truth, did, "app.bsky.actor.profile/nope")
        assert status == 400 and b'"RecordNotFound"' in body
        status, body = await get_record(http, truth, did, PROFILE)
        assert status == 200 and read_car(body).root_cid


@pytest.mark.parametrize(("status", "error"), [(404, "Not Found"), (501, "MethodNotImplemented")])
async def test_relay_without_list_repos_by_collection(
    http: aiohttp.ClientSession, status: int, error: str
) -> None:
    async with small_devnet(no_list_repos_by_collection=status) as (relay, _):
        url = relay_base(relay) + "/xrpc/com.atproto.sync.listReposByCollection?collection=a.b.c"
        async with http.get(url) as response:
            assert response.status == status
            assert (await response.json())["error"] == error
        url = relay_base(relay) + "/xrpc/com.atproto.sync.listRepos"
        async with http.get(url) as response:  # listRepos still works
            assert response.status == 200


def test_cli_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = "--history-model year --model-accounts 30 --ignore-since --missing-record not-found"
    config = config_from_args(parser.parse_args([*flags.split(), "--no-list-repos-by-collection"]))
    assert (config.history_model, config.model_accounts, config.ignore_since) == ("year", 30, True)
    assert config.missing_record == "not-found" and config.no_list_repos_by_collection == 404
    config = config_from_args(parser.parse_args(["--no-list-repos-by-collection", "501"]))
    assert config.no_list_repos_by_collection == 501 and config.history_model == ""
    assert config.model_accounts == 0 and not config.ignore_since
    assert config.missing_record == "proof"
    default = config_from_args(parser.parse_args(["--history-model", "year"]))
    assert default.model_accounts == 2000
    with pytest.raises(SystemExit):
        parser.parse_args(["--no-list-repos-by-collection", "500"])
