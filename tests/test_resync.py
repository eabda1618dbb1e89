"""The resync queue (repo_resyncs) and ResyncService against the devnet's PDS hosts over real
HTTP and a real PostgreSQL: stale rows removed and tombstoned, newer live rows kept, retries,
failures, leases, two claimers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from backfill import resync
from backfill.resync_queries import RESYNC_DONE
from backfill.settings import BackfillSettings
from firehose.devnet.httpfaults import HttpFaults
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.live.chain import load_repo_states
from firehose.model import Action, Batch, RecordWrite
from firehose.storage.writer import apply_batch

OLD_REV = "2222222222222"  # older than any devnet rev
NEW_REV = "zzzzzzzzzzzzz"  # newer than any devnet rev
LIKE = "app.bsky.feed.like"


def _like(did: str, rkey: str, rev: str, cid: str = "bafyreistale") -> RecordWrite:
    record = {"$type": LIKE, "createdAt": "2024-01-01T00:00:00Z", "subject": {}}
    return RecordWrite(did, LIKE, rkey, rev, Action.CREATE, cid, record)


async def _state(conn: asyncpg.Connection, did: str) -> dict[str, Any]:
    return dict(await conn.fetchrow("SELECT * FROM repo_resyncs WHERE did = $1", did))


async def _run_until(
    service: resync.ResyncService,
    conn: asyncpg.Connection,
    did: str,
    states: set[str],
    also: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    return (await _run_all(service, conn, [did], states, also))[0]


async def _run_all(
    service: resync.ResyncService,
    conn: asyncpg.Connection,
    dids: list[str],
    states: set[str],
    also: Callable[[], bool] = lambda: True,
) -> list[dict[str, Any]]:
    """Run the service until every repo's row is in `states` and `also()` holds (e.g. its log
    line is out: the row is committed a moment before the line is logged, and stopping the
    service in between would cancel the line)."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        for _ in range(400):
            rows = [await _state(conn, did) for did in dids]
            if all(row["state"] in states for row in rows) and also():
                return rows
            assert not task.done(), task
            await asyncio.sleep(0.05)
        raise AssertionError(f"resyncs not {states}: {rows}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _settings(relay: DevnetRelay, **kw: Any) -> BackfillSettings:
    base = BackfillSettings(plc_url=relay.network.plc_url, allow_private_network=True)
    return replace(base, **kw)


@pytest_asyncio.fixture
async def devnet() -> AsyncIterator[DevnetRelay]:
    config = DevnetConfig(seed=7, accounts=8, events=120, repo_accounts=2, repo_records=40)
    async with DevnetRelay(config) as relay:
        yield relay


def _repo_records(truth: dict[str, Any], did: str) -> dict[str, str]:
    return {u: c for u, c in truth["records"].items() if u.split("/")[2] == did}


@pytest.mark.asyncio
async def test_resync_makes_the_repo_equal_to_its_pds(
    devnet: DevnetRelay, conn: asyncpg.Connection, db_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    truth = devnet.truth()
    did, other = sorted({u.split("/")[2] for u in truth["records"]})[:2]
    expected = _repo_records(truth, did)
    some_uri = sorted(expected)[0]
    # Before: a stale row the PDS no longer has, a newer live row, a stale cid of a record the
    # snapshot has, and an old row of another repo.
    collection, rkey = some_uri.split("/")[3], some_uri.split("/")[4]
    wrong = RecordWrite(did, collection, rkey, OLD_REV, Action.CREATE, "bafyreiwrong", {})
    await apply_batch(
        conn,
        Batch(
            writes=[
                _like(did, "3stalestale22", OLD_REV),
                _like(did, "3newlivenew22", NEW_REV),
                wrong,
                _like(other, "3otherother22", OLD_REV),
            ]
        ),
        heads=[(did, OLD_REV, None), (other, OLD_REV, None)],  # the head the live stream left
    )
    assert await resync.request(conn, [did]) == 1
    registry = CollectorRegistry()
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    try:
        service = resync.ResyncService(
            _settings(devnet), pool, registry, relay_url=devnet.url, worker_id=0
        )
        with caplog.at_level(logging.INFO, logger="backfill.resync"):
            row = await _run_until(
                service, conn, did, {"done"}, also=lambda: "resynced at rev" in caplog.text
            )
    finally:
        await pool.close()
    rows = await conn.fetch("SELECT uri, cid, rev FROM records WHERE did = $1", did)
    got = {r["uri"]: r["cid"] for r in rows}
    live = f"at://{did}/{LIKE}/3newlivenew22"
    assert got == {**expected, live: "bafyreistale"}
    assert row["records"] == len(expected) and row["removed"] == 1 and row["error"] is None
    stale = f"at://{did}/{LIKE}/3stalestale22"
    assert (
        await conn.fetchval("SELECT rev FROM record_tombstones WHERE uri = $1", stale)
        == (row["rev"])
    )
    assert await conn.fetchval("SELECT count(*) FROM likes WHERE uri = $1", stale) == 0
    assert await conn.fetchval("SELECT rev FROM actors WHERE did = $1", did) == row["rev"]
    # Not a chain head: live commits older than the snapshot may still come and must apply.
    assert (await load_repo_states(conn, [did]))[did].rev == OLD_REV
    assert await conn.fetchval("SELECT count(*) FROM records WHERE did = $1", other) == 1
    assert f"[RESYNC] {did} resynced at rev {row['rev']}: {len(expected)} records, 1 removed" in (
        caplog.text
    )
    assert registry.get_sample_value("firehose_resyncs_total", {"outcome": "done"}) == 1
    # The tombstone: an older create of the removed record (a late event) cannot resurrect it.
    between = row["rev"][:-1] + "2"
    stats = await apply_batch(conn, Batch(writes=[_like(did, "3stalestale22", between)]))
    assert stats.upserted == 0
    # Resyncing again changes nothing (idempotent).
    await resync.request(conn, [did])
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    try:
        service = resync.ResyncService(
            _settings(devnet), pool, CollectorRegistry(), relay_url=devnet.url, worker_id=0
        )
        row = await _run_until(service, conn, did, {"done"})
    finally:
        await pool.close()
    assert row["removed"] == 0
    rows = await conn.fetch("SELECT uri, cid FROM records WHERE did = $1", did)
    assert {r["uri"]: r["cid"] for r in rows} == got


@pytest.mark.asyncio
async def test_unknown_repo_fails_with_its_error(
    devnet: DevnetRelay, conn: asyncpg.Connection, db_dsn: str
) -> None:
    did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"  # unknown to the PLC directory
    await resync.request(conn, [did], "sync_event")
    registry = CollectorRegistry()
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    try:
        service = resync.ResyncService(
            _settings(devnet, resync_max_attempts=2), pool, registry,
            relay_url=devnet.url, worker_id=0,
        )  # fmt: skip
        row = await _run_until(service, conn, did, {"failed"})
    finally:
        await pool.close()
    assert row["error"] and row["lease_owner"] is None and row["attempts"] >= 1
    assert registry.get_sample_value("firehose_resyncs_total", {"outcome": "failed"}) == 1
    # A new request re-arms it.
    assert await resync.request(conn, [did]) == 1
    assert (await _state(conn, did))["state"] == "pending"


@pytest.mark.asyncio
async def test_transient_host_errors_are_retried(conn: asyncpg.Connection, db_dsn: str) -> None:
    faults = HttpFaults.parse(fail_5xx=["2"])  # every 2nd request of each host: a 5xx
    config = DevnetConfig(seed=3, accounts=4, events=40, repo_accounts=1, repo_records=10)
    async with DevnetRelay(replace(config, http_faults=faults)) as relay:
        truth = relay.truth()
        dids = sorted(d for d, status in truth["statuses"].items() if status == "active")
        await resync.request(conn, dids)
        registry = CollectorRegistry()
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
        try:
            service = resync.ResyncService(
                _settings(relay, resync_max_attempts=10), pool, registry,
                relay_url=relay.url, worker_id=0,
            )  # fmt: skip
            await _run_all(service, conn, dids, {"done"})
        finally:
            await pool.close()
    rows = await conn.fetch("SELECT uri, cid FROM records")
    expected = {u: c for u, c in truth["records"].items() if u.split("/")[2] in dids}
    assert {r["uri"]: r["cid"] for r in rows} == expected
    assert (registry.get_sample_value("firehose_resyncs_total", {"outcome": "retry"}) or 0) >= 1


# -- the queue --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_claimers_share_without_overlap(db_dsn: str, conn: asyncpg.Connection) -> None:
    dids = [f"did:plc:{i:024d}" for i in range(40)]
    assert await resync.request(conn, dids + dids[:5]) == 40
    c1, c2 = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        got: list[list[resync.ResyncClaim]] = [[], []]
        for _ in range(5):
            a, b = await asyncio.gather(
                resync.claim(c1, "h:w0:1", 7, 30), resync.claim(c2, "h:w1:2", 7, 30)
            )
            got[0] += a
            got[1] += b
    finally:
        await c1.close()
        await c2.close()
    first, second = {c.did for c in got[0]}, {c.did for c in got[1]}
    assert not first & second and first | second == set(dids)
    assert await resync.counts(conn) == {"pending": 0, "in_progress": 40, "done": 0, "failed": 0}
    assert await resync.claim(conn, "h:w2:3", 10, 30) == []


@pytest.mark.asyncio
async def test_expired_leases_come_back_then_fail(conn: asyncpg.Connection) -> None:
    did = "did:plc:lease"
    await resync.request(conn, [did])
    assert [c.did for c in await resync.claim(conn, "h:w0:1", 5, 30)] == [did]
    assert await resync.reclaim(conn, max_attempts=2) == 0  # lease still valid
    await conn.execute("UPDATE repo_resyncs SET lease_until = now() - interval '1 s'")
    assert await resync.reclaim(conn, max_attempts=2) == 1
    row = await _state(conn, did)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("pending", 1, None)
    assert [c.attempts for c in await resync.claim(conn, "h:w0:1", 5, 30)] == [1]
    # A dead owner's lease is taken back at once; the last attempt fails the request.
    assert await resync.reclaim(conn, max_attempts=2, dead_owners=["h:w0:1"]) == 1
    assert (await _state(conn, did))["state"] == "failed"


@pytest.mark.asyncio
async def test_a_request_during_a_resync_runs_it_again(conn: asyncpg.Connection) -> None:
    did = "did:plc:again"
    await resync.request(conn, [did])
    await resync.claim(conn, "h:w0:1", 5, 30)
    await apply_batch(conn, Batch(resyncs=[(did, "prev_data_mismatch")], cursor=9))
    assert await conn.fetchval(RESYNC_DONE, did, "h:w9:9", "3abc", 0, 0) is None  # not its lease
    # The resync in hand may predate the new event: pending again once it is done.
    assert await conn.fetchval(RESYNC_DONE, did, "h:w0:1", "3abc", 0, 0) == "pending"
    await resync.claim(conn, "h:w0:1", 5, 30)
    assert await conn.fetchval(RESYNC_DONE, did, "h:w0:1", "3abd", 0, 0) == "done"


@pytest.mark.asyncio
async def test_account_held_inactive_is_marked_active_once_its_pds_serves_it(
    devnet: DevnetRelay, conn: asyncpg.Connection, db_dsn: str
) -> None:
    """The live stream dropped a commit of an account it held deactivated (a reactivation
    missed in a gap): the repo is served by its PDS, so the resync marks it active again."""
    truth = devnet.truth()
    did = sorted(d for d, s in truth["statuses"].items() if s == "active")[0]
    other = sorted(d for d, s in truth["statuses"].items() if s == "active")[1]
    await conn.execute(
        "INSERT INTO actors (did, status, active) VALUES ($1, 'deactivated', false),"
        " ($2, 'deactivated', false)",
        did,
        other,
    )
    await resync.request(conn, [did], "account_inactive")
    await resync.request(conn, [other], "since_mismatch")  # no evidence of a reactivation
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    try:
        service = resync.ResyncService(
            _settings(devnet), pool, CollectorRegistry(), relay_url=devnet.url, worker_id=0
        )
        await _run_all(service, conn, [did, other], {"done"})
    finally:
        await pool.close()
    rows = await conn.fetch(
        "SELECT did, status, active FROM actors WHERE did = ANY($1)", [did, other]
    )
    assert {r["did"]: (r["status"], r["active"]) for r in rows} == {
        did: ("active", True),
        other: ("deactivated", False),
    }
