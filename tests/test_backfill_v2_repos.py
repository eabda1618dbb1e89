"""Repo v2 commits (no `rev`): read with `V2_COMMIT_REV`, which every v3 commit supersedes.

* `read_commit` over the real CARs: v2 commits get the lowest TID, v3 and late v2 commits
  (the reference's v2 schema allows a rev) keep theirs, a v3 commit without one is refused;
* `BACKFILL_DAYS=-1` over the nine complete real repository CARs (five v2, four v3) served
  verbatim by the devnet's PDS hosts: every record path and CID of each is stored. The
  expected set is the devnet's own walk of each file (libipld, not the worker's decoder),
  and its size the vectors README's record count; the tenth CAR (`repo_slice`, v2, one MST
  node missing) is refused as incomplete with nothing written;
* convergence both ways: a v3 live write after the backfill supersedes v2 rows (update and
  delete); a v3 live write before it is not overwritten by them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg
import cbor2
import pytest
from aiohttp import web
from backfill_http import host_client, serve
from backfill_support import run_backfill_service
from test_protocol_support import FIXTURES, PARTIAL_CAR, REPO_CARS

from backfill.download import fetch_repo
from backfill.hosts import FetchError
from backfill.settings import PROFILES, BackfillSettings
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.model import Action, Batch, RecordWrite
from firehose.protocol.car import Car, read_car
from firehose.protocol.cid import cid_str_from_bytes
from firehose.protocol.errors import ProtocolError
from firehose.protocol.mst import V2_COMMIT_REV, read_commit
from firehose.protocol.syntax import is_tid
from firehose.storage.writer import apply_batch

pytestmark = pytest.mark.slow

COMPLETE_CARS = {FIXTURES / name: spec for name, spec in REPO_CARS.items()}
V2_CARS = [path for path, (version, _) in COMPLETE_CARS.items() if version == 2]
LIVE_REV = "3jzfcijpj2z2a"  # a v3 rev of 2023, the year repos moved to v3
SETTINGS = BackfillSettings(
    days=-1,
    profile="unthrottled",
    batch_size=500,
    batch_delay_ms=0,
    max_concurrent=4,
    max_memory_mb=PROFILES["unthrottled"].max_memory_mb * 4,
    use_idle=False,
    allow_private_network=True,
    max_attempts=2,
)


def test_lowest_tid() -> None:
    assert is_tid(V2_COMMIT_REV)
    assert V2_COMMIT_REV == "2222222222222"  # base32-sortable zero: below every other TID
    assert V2_COMMIT_REV < LIVE_REV


@pytest.mark.parametrize("path", list(COMPLETE_CARS), ids=lambda p: p.name[:24])
def test_read_commit_of_real_cars(path: Path) -> None:
    version, _ = COMPLETE_CARS[path]
    car = read_car(path.read_bytes())
    info = read_commit(car)
    raw = cbor2.loads(car.blocks[car.root_cid])  # a second decoder: the commit as stored
    assert raw["version"] == info.version == version
    if version == 2:
        assert "rev" not in raw and info.rev == V2_COMMIT_REV
    else:
        assert info.rev == raw["rev"] and info.rev > V2_COMMIT_REV


def _commit_car(commit: dict[str, object]) -> Car:
    block = cbor2.dumps(commit, canonical=True)  # canonical = DAG-CBOR's key order
    cid = b"\x01\x71\x12\x20" + hashlib.sha256(block).digest()
    return Car(cid_str_from_bytes(cid), cid, {cid: block})


def test_v2_commit_with_a_rev_keeps_it_and_v3_needs_one() -> None:
    data = cbor2.CBORTag(42, b"\x00\x01\x71\x12\x20" + bytes(32))
    base = {"did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "data": data, "prev": None, "sig": b""}
    assert read_commit(_commit_car({**base, "version": 2})).rev == V2_COMMIT_REV
    late = read_commit(_commit_car({**base, "version": 2, "rev": LIVE_REV}))
    assert late.rev == LIVE_REV and late.version == 2  # packages/repo legacyV2Commit
    with pytest.raises(ProtocolError):
        read_commit(_commit_car({**base, "version": 3}))
    with pytest.raises(ProtocolError):
        read_commit(_commit_car({**base, "version": 2, "rev": 7}))
    # A rev is a TID (found by the window fuzz target: a commit with rev "" was read).
    for rev in ("", "zzzzzzzzzzzzz", "3k2222222222"):
        for version in (2, 3):
            with pytest.raises(ProtocolError):
                read_commit(_commit_car({**base, "version": version, "rev": rev}))


async def _rows(dsn: str, dids: list[str]) -> dict[str, tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT uri, cid, rev FROM records WHERE did = ANY($1::text[])", dids
        )
        return {r["uri"]: (r["cid"], r["rev"]) for r in rows}
    finally:
        await conn.close()


def _live(uri: str, action: Action, cid: str | None) -> RecordWrite:
    did, collection, rkey = uri.removeprefix("at://").split("/")
    record = None if cid is None else {"$type": collection, "createdAt": "2023-09-01T00:00:00Z"}
    return RecordWrite(did, collection, rkey, LIVE_REV, action, cid, record)


async def test_whole_history_of_the_real_cars_v2_included(new_database: object) -> None:
    config = DevnetConfig(
        seed=23, accounts=3, events=20, extra_cars=tuple(str(p) for p in COMPLETE_CARS)
    )
    async with DevnetRelay(config) as relay:
        truth = relay.truth()
        served = {car.path: car.did for car in relay.network.cars}
        dids = sorted(served.values())
        expected = {u: c for u, c in truth["records"].items() if u.split("/")[2] in served.values()}
        for path, (_, count) in COMPLETE_CARS.items():
            did = served[str(path)]
            assert sum(1 for u in expected if u.split("/")[2] == did) == count, path.name
        v2_dids = {served[str(p)] for p in V2_CARS}
        assert len(v2_dids) == 5

        # 1. Backfill first, live v3 commits after.
        dsn = await new_database()  # type: ignore[operator]
        await run_backfill_service(relay, dsn, SETTINGS, timeout_s=180)
        rows = await _rows(dsn, dids)
        assert {u: c for u, (c, _) in rows.items()} == expected
        revs = {served[str(p)]: read_commit(read_car(p.read_bytes())).rev for p in COMPLETE_CARS}
        for uri, (_, rev) in rows.items():
            did = uri.split("/")[2]
            assert rev == (V2_COMMIT_REV if did in v2_dids else revs[did]), uri
        conn = await asyncpg.connect(dsn)
        try:
            job = await conn.fetchrow("SELECT * FROM backfill_jobs")
            assert job["status"] == "completed" and job["repos_failed"] == 0, dict(job)
            states = await conn.fetch(
                "SELECT did, state, error FROM backfill_repos WHERE did = ANY($1::text[])", dids
            )
            assert {r["did"]: r["state"] for r in states} == dict.fromkeys(dids, "done")
            v2_uris = sorted(u for u in expected if u.split("/")[2] in v2_dids)
            updated, deleted = v2_uris[0], v2_uris[-1]
            new_cid = "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
            batch = Batch(
                writes=[_live(updated, Action.UPDATE, new_cid), _live(deleted, Action.DELETE, None)]
            )
            await apply_batch(conn, batch)
        finally:
            await conn.close()
        after = await _rows(dsn, dids)
        assert after[updated] == (new_cid, LIVE_REV)
        assert deleted not in after
        assert len(after) == len(expected) - 1

        # 2. Live v3 commits first, the backfill after: its v2 rows do not overwrite them.
        dsn2 = await new_database()  # type: ignore[operator]
        conn = await asyncpg.connect(dsn2)
        try:
            await apply_batch(conn, batch)
        finally:
            await conn.close()
        await run_backfill_service(relay, dsn2, SETTINGS, timeout_s=180)
        assert await _rows(dsn2, dids) == after


async def test_partial_v2_car_is_refused_whole(tmp_path: Path) -> None:
    """`repo_slice.car` (v2, one MST node missing) cannot be read whole: a clear, retryable
    `truncated` error, never a partial repo."""
    data = (FIXTURES / PARTIAL_CAR).read_bytes()
    did = read_commit(read_car(data)).did

    async def get_repo(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="application/vnd.ipld.car")

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.sync.getRepo", get_repo)
    async with serve(app) as base, host_client() as http:
        with pytest.raises(FetchError) as info:
            await fetch_repo(http, base, did, max_bytes=1 << 20, spool_dir=tmp_path)
    assert info.value.reason == "truncated" and "incomplete repo" in str(info.value)
