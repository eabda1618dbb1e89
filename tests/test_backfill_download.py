"""backfill.download.fetch_repo: real repo CARs served by a local aiohttp server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from aiohttp import web
from backfill_http import host_client, serve

from backfill.blocks import BlockSpool, MemoryBlocks, MemoryBudget
from backfill.download import (
    RepoSnapshot,
    SkippedRecord,
    fetch_repo,
)
from backfill.hosts import FetchError
from backfill.window import Window
from firehose.model import Action, Batch, RecordWrite
from firehose.protocol.car import read_car
from firehose.protocol.mst import iter_repo_records, read_commit
from firehose.protocol.syntax import is_tid, tid_to_datetime
from firehose.storage.prepare import ApplyStats, prepare
from firehose.storage.snapshot_rows import snapshot_rows

FIXTURES = Path(__file__).parent / "fixtures"
BNEWBOLD = "indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car"
CARS = {
    "bnewbold": (FIXTURES / BNEWBOLD, 38),
    "rsky": (FIXTURES / "rsky/rsky-repo/resources/test/valid_repo.car", 6),
    "arroba": (FIXTURES / "arroba/arroba/tests/snarfed2.car", 5),
}
EVERYTHING = Window(None)


def truth(car_bytes: bytes) -> tuple[str, str, dict[str, str], dict[str, dict]]:
    """(did, rev, path -> cid, path -> record) by the in-memory protocol reader."""
    car = read_car(car_bytes)
    info, records = iter_repo_records(car)
    cids: dict[str, str] = {}
    values: dict[str, dict] = {}
    for collection, rkey, cid, record in records:
        cids[f"{collection}/{rkey}"] = cid
        values[f"{collection}/{rkey}"] = record
    assert info.rev is not None
    return info.did, info.rev, cids, values


def getrepo_app(get_body: Callable[[str], bytes], mode: str = "plain") -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = get_body(request.query["did"])
        if mode == "plain":
            return web.Response(body=body, content_type="application/vnd.ipld.car")
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.ipld.car"})
        if mode == "cut":  # announces the full length, sends half, closes
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        resp.enable_chunked_encoding()  # mode "chunked": no Content-Length
        await resp.prepare(request)
        view = memoryview(body)
        for i in range(0, len(body), 4096):
            await resp.write(view[i : i + 4096])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.sync.getRepo", handler)
    return app


@asynccontextmanager
async def pds(body: bytes, mode: str = "plain") -> AsyncIterator[str]:
    async with serve(getrepo_app(lambda _did: body, mode)) as base:
        yield base


@pytest.mark.parametrize("name", sorted(CARS))
async def test_fetch_real_repos_whole_history(name: str, tmp_path: Path) -> None:
    path, count = CARS[name]
    body = path.read_bytes()
    did, rev, cids, values = truth(body)
    assert len(cids) == count
    async with pds(body, "chunked") as base, host_client() as http:
        snap = await fetch_repo(http, base, did, max_bytes=len(body), spool_dir=tmp_path)
    with snap:
        assert (snap.did, snap.rev, snap.records) == (did, rev, count)
        assert snap.bytes_downloaded == len(body)
        assert snap.commit_cid == read_car(body).root
        assert snap.data_cid == read_commit(read_car(body)).data_cid
        writes = list(snap.writes(EVERYTHING))
        assert all(isinstance(w, RecordWrite) for w in writes)
        got = {f"{w.collection}/{w.rkey}": w for w in writes if isinstance(w, RecordWrite)}
        assert {p: w.cid for p, w in got.items()} == cids
        assert {p: w.record for p, w in got.items()} == values
        assert {(w.did, w.rev, w.action) for w in got.values()} == {(did, rev, Action.CREATE)}
        # In MST key order, and iterable again.
        assert [f"{w.collection}/{w.rkey}" for w in got.values()] == sorted(cids)
        assert len(list(snap.writes(EVERYTHING))) == count
        # The records as the backfill writes them: rows straight from the items, the same as
        # the writer's generic steps make of the writes.
        items = [i for i in snap.items(EVERYTHING) if not isinstance(i, SkippedRecord)]
        direct, generic = ApplyStats(), ApplyStats()
        rows = snapshot_rows(did, items, [snap.head], direct)
        assert rows == prepare(Batch(writes=writes), generic, [snap.head])
        assert direct == generic and len(rows.records) == count
    assert os.listdir(tmp_path) == []  # the spool file is gone
    with pytest.raises(ValueError):
        list(snap.writes(EVERYTHING))


async def test_window_filters_by_tid_then_created_at(tmp_path: Path) -> None:
    path, _ = CARS["bnewbold"]
    body = path.read_bytes()
    did, _rev, cids, values = truth(body)
    tid_times = sorted(tid_to_datetime(p.split("/")[1]) for p in cids if is_tid(p.split("/")[1]))
    cutoff = tid_times[len(tid_times) // 2]
    window = Window(cutoff)
    expected = {p for p in cids if window.keeps(p.split("/")[1], values[p])}
    assert 0 < len(expected) < len(cids)
    async with pds(body) as base, host_client() as http:
        snap = await fetch_repo(http, base, did, max_bytes=10 << 20, spool_dir=tmp_path)
    with snap:
        results = list(snap.writes(window))
    kept = {f"{w.collection}/{w.rkey}" for w in results if isinstance(w, RecordWrite)}
    skipped = [s for s in results if isinstance(s, SkippedRecord)]
    assert kept == expected
    assert {s.reason for s in skipped} == {"window"}
    assert len(kept) + len(skipped) == len(cids)
    old_tids = [s for s in skipped if is_tid(s.rkey)]
    assert old_tids and all(tid_to_datetime(s.rkey) < cutoff for s in old_tids)


async def test_corruption_truncation_size_and_did(tmp_path: Path) -> None:
    path, _ = CARS["rsky"]
    body = path.read_bytes()
    did = truth(body)[0]
    corrupt = bytearray(body)
    corrupt[-10] ^= 0x01  # inside the last block: its sha256 no longer matches its CID
    cases: list[tuple[bytes, str, str, int, str, bool]] = [
        (bytes(corrupt), "plain", did, len(body), "bad_response", False),
        (body, "cut", did, len(body), "truncated", True),  # the HTTP body ends early
        (body[: len(body) - 7], "chunked", did, len(body), "truncated", True),  # mid-section
        (body, "plain", did, len(body) - 1, "too_large", False),  # Content-Length over cap
        (body, "chunked", did, len(body) - 1, "too_large", False),  # counted while streaming
        (body, "plain", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", len(body), "bad_response", False),
        (b"", "plain", did, len(body), "truncated", True),
    ]
    for data, mode, ask, cap, reason, transient in cases:
        async with pds(data, mode) as base, host_client() as http:
            with pytest.raises(FetchError) as info:
                await fetch_repo(http, base, ask, max_bytes=cap, spool_dir=tmp_path)
        assert (info.value.reason, info.value.transient) == (reason, transient), (mode, reason)
        assert os.listdir(tmp_path) == []


async def test_cut_at_a_block_boundary_is_incomplete(tmp_path: Path) -> None:
    """A CAR that ends cleanly between sections but lacks blocks: transient, not partial."""
    path, _ = CARS["bnewbold"]
    body = path.read_bytes()
    car = read_car(body)
    did = truth(body)[0]
    from firehose.devnet import dagcbor

    sections = list(car.blocks.items())[: len(car.blocks) // 2]
    if car.root_cid not in dict(sections):
        sections.insert(0, (car.root_cid, car.blocks[car.root_cid]))
    partial = dagcbor.write_car(car.root_cid, sections)
    async with pds(partial) as base, host_client() as http:
        with pytest.raises(FetchError) as info:
            await fetch_repo(http, base, did, max_bytes=len(body), spool_dir=tmp_path)
    assert (info.value.reason, info.value.transient) == ("truncated", True)


def test_spool_collisions_and_duplicates(tmp_path: Path) -> None:
    spool = BlockSpool(tmp_path)
    digest = bytes(range(32))
    a = b"\x01\x71\x12\x20" + digest
    b = b"\x01\x55\x12\x20" + digest  # same digest, other codec: same index key
    spool.add(a, b"first")
    spool.add(b, b"second")
    spool.add(a, b"first again")  # a repeated section: the last copy wins
    with pytest.raises(ValueError):
        spool.get(a)  # not sealed yet
    spool.seal()
    assert spool.get(a) == b"first again" and spool.get(b) == b"second"
    assert spool.has_key_for(a) and not spool.has_key_for(b"\x01\x71\x12\x20" + bytes(32))
    assert spool.get(b"\x01\x71\x12\x20" + bytes(32)) is None
    spool.close()


BIG_RECORDS = 50_000
BIG_DID = "did:plc:bigrepobigrepobigrepobig"


@pytest.fixture
def big_car(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A synthetic repo CAR built in a subprocess (its build memory stays out of our RSS)."""
    car_path = tmp_path / "big.car"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = Path(__file__).parent / "backfill_bigrepo.py"
    built = subprocess.run(
        [sys.executable, str(script), str(car_path), str(BIG_RECORDS), BIG_DID],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    return car_path, json.loads(built.stdout)


async def test_large_repo_memory_stays_below_car_size(
    tmp_path: Path, big_car: tuple[Path, dict[str, str]]
) -> None:
    """A ~55 MB, 50k-record repo downloads and walks with RSS growth far below its size."""
    records, did = BIG_RECORDS, BIG_DID
    car_path, info = big_car
    car_bytes = int(info["bytes"])
    spool_dir = tmp_path / "spool"

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(car_path)  # sendfile: the server adds no RSS

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.sync.getRepo", handler)

    proc = psutil.Process()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    async with serve(app) as base, host_client() as http:
        baseline = proc.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            snap: RepoSnapshot = await fetch_repo(
                http, base, did, max_bytes=car_bytes, spool_dir=spool_dir
            )
            with snap:
                fetched_s = time.monotonic() - started
                kept = skipped = 0
                cutoff = datetime.fromtimestamp(1_700_000_000 + records // 2, UTC)
                for item in snap.writes(Window(cutoff)):
                    if isinstance(item, RecordWrite):
                        kept += 1
                    else:
                        skipped += 1
        finally:
            stop.set()
            sampler.join()
    total_s = time.monotonic() - started
    growth = peak - baseline
    print(
        f"\nlarge repo: CAR {car_bytes / 1e6:.1f} MB, {records} records, {snap.blocks} blocks; "
        f"fetch {fetched_s:.1f} s, fetch+walk {total_s:.1f} s; RSS growth {growth / 1e6:.1f} MB "
        f"= {100 * growth / car_bytes:.1f}% of the CAR"
    )
    assert snap.rev == info["rev"] and snap.data_cid == info["data"] and snap.records == records
    assert (kept, skipped) == (records // 2, records // 2)
    assert growth < car_bytes / 4, f"RSS grew {growth} B for a {car_bytes} B CAR"


@pytest.mark.parametrize("name", sorted(CARS))
async def test_in_memory_and_spilled_snapshots_agree(name: str, tmp_path: Path) -> None:
    """A small repo stays in memory (no spool file, one MST walk); the same CAR forced to
    spill to the disk spool after its first block yields exactly the same writes."""
    path, count = CARS[name]
    body = path.read_bytes()
    did = truth(body)[0]
    async with pds(body, "chunked") as base, host_client() as http:
        small = await fetch_repo(http, base, did, max_bytes=len(body), spool_dir=tmp_path)
        assert os.listdir(tmp_path) == []  # nothing on disk for a small repo
        spilled = await fetch_repo(
            http, base, did, max_bytes=len(body), spool_dir=tmp_path, memory_max_bytes=1
        )
    with small, spilled:
        assert small.in_memory and not spilled.in_memory
        assert (small.rev, small.records, small.blocks) == (
            spilled.rev,
            spilled.records,
            spilled.blocks,
        )
        a, b = list(small.writes(EVERYTHING)), list(spilled.writes(EVERYTHING))
        assert a == b and len(a) == count
        assert list(small.writes(EVERYTHING)) == a  # iterable again
    with pytest.raises(ValueError):
        list(small.writes(EVERYTHING))


def test_memory_blocks_take_from_the_budget_and_give_it_back() -> None:
    budget = MemoryBudget(1000)
    first, second = MemoryBlocks(budget), MemoryBlocks(budget)
    first.add(b"a" * 36, b"x" * 364)  # 400 bytes with its CID
    assert first.reserve(10_000) and budget.used_bytes == 400
    first.add(b"b" * 36, b"x" * 364)
    assert first.reserve(10_000) and budget.used_bytes == 800  # only what was added
    second.add(b"c" * 36, b"x" * 364)
    assert not second.reserve(10_000) and budget.used_bytes == 800  # no room: nothing taken
    assert not first.reserve(700)  # past the repo's own cap, whatever the budget
    first.close()
    assert budget.used_bytes == 0
    assert second.reserve(10_000) and budget.used_bytes == 400
    second.close()
    second.close()
    assert budget.used_bytes == 0


async def test_a_full_memory_budget_spills_to_disk_and_every_repo_gives_it_back(
    tmp_path: Path,
) -> None:
    """Two repos that the process's budget cannot hold together: the first stays in memory,
    the second spills to the disk spool, both yield the same writes, and the budget is whole
    again once they close, also after a download that failed half way."""
    path, count = CARS[sorted(CARS)[0]]
    body = path.read_bytes()
    did = truth(body)[0]
    budget = MemoryBudget(len(body) + len(body) // 2)
    async with pds(body, "chunked") as base, host_client() as http:
        kept = await fetch_repo(
            http, base, did, max_bytes=len(body), spool_dir=tmp_path, memory=budget
        )
        assert 0 < budget.used_bytes <= len(body)
        spilled = await fetch_repo(
            http, base, did, max_bytes=len(body), spool_dir=tmp_path, memory=budget
        )
        with kept, spilled:
            assert kept.in_memory and not spilled.in_memory
            a, b = list(kept.writes(EVERYTHING)), list(spilled.writes(EVERYTHING))
            assert a == b and len(a) == count
        assert budget.used_bytes == 0
    async with pds(body[: len(body) - 7], "chunked") as base, host_client() as http:
        with pytest.raises(FetchError):
            await fetch_repo(
                http, base, did, max_bytes=len(body), spool_dir=tmp_path, memory=budget
            )
    assert budget.used_bytes == 0
