"""End to end: a devnet relay forging every Nth commit (--forge-every) -> a worker with
VERIFY_SIGNATURES=true resolving keys from the devnet's PLC directory over HTTP -> the
tables equal the truth (which holds no forged record), every forgery dropped and counted,
its repo queued for a resync. The control run without verification proves the forgeries
would otherwise land."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from backfill_support import HistoryDevnet
from support import WorkerProcess, assert_matches_truth, free_port, scrape_metrics, wait_for_cursor

pytestmark = pytest.mark.slow

EVENTS = 3000
ACCOUNTS = 60
FORGE_EVERY = 25


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryDevnet]:
    relay = HistoryDevnet.start(
        tmp_path_factory.mktemp("forging-devnet"),
        *("--seed", "21", "--events", str(EVENTS), "--accounts", str(ACCOUNTS)),
        *("--forge-every", str(FORGE_EVERY), "--pds-hosts", "1"),
    )
    yield relay
    relay.stop()


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" ([0-9.e+]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


async def test_forged_commits_are_dropped_counted_and_resynced(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    truth = devnet.truth()
    forged = truth["forged"]
    assert len(forged) == EVENTS // FORGE_EVERY
    port = free_port()
    worker = WorkerProcess.start(
        tmp_path,
        db_dsn,
        devnet.relay_url,
        START_CURSOR="0",
        METRICS_PORT=str(port),
        VERIFY_SIGNATURES="true",
        PLC_URL=devnet.plc_url,
        ALLOW_PRIVATE_NETWORK="true",
    )
    try:
        await wait_for_cursor(db_dsn, truth["last_seq"], worker=worker, timeout_s=90)
        await assert_matches_truth(db_dsn, truth)
        text = await scrape_metrics(port)
        assert metric(text, "firehose_events_dropped_total", reason="bad_signature") == len(forged)
        assert metric(text, "firehose_events_dropped_total", reason="identity_unavailable") == 0
        assert metric(text, "firehose_signatures_total", result="invalid") == len(forged)
        valid = metric(text, "firehose_signatures_total", result="valid")
        assert valid > EVENTS / 2
        # Keys come from the cache: about one PLC lookup per account (plus the #identity
        # refreshes and one re-fetch per forged repo), not one per commit.
        plc_requests = devnet.stats()["plc_requests"]
        assert plc_requests < valid / 4, (plc_requests, valid)
        forged_dids = {uri.split("/")[2] for uri in forged}
        conn = await asyncpg.connect(db_dsn)
        try:
            assert not await conn.fetchval(
                "SELECT count(*) FROM records WHERE uri = ANY($1::text[])", forged
            )
            if await conn.fetchval("SELECT to_regclass('repo_resyncs') IS NOT NULL"):
                rows = await conn.fetch("SELECT did, reason FROM repo_resyncs")
                requested = {r["did"] for r in rows if r["reason"] == "bad_signature"}
                assert requested == forged_dids
        finally:
            await conn.close()
        assert "(bad_signature)" in worker.log()
        print(
            f"\nverify e2e: {EVENTS} events, {len(forged)} forged commits dropped "
            f"({len(forged_dids)} repos queued for a resync), {valid:.0f} valid signatures, "
            f"{plc_requests} PLC requests, 0 rows lost"
        )
    finally:
        if worker.proc.poll() is None:
            worker.kill9()


async def test_without_verification_the_forgeries_land(
    devnet: HistoryDevnet, db_dsn: str, tmp_path: Path
) -> None:
    """The control: the same stream without VERIFY_SIGNATURES stores forged records."""
    truth = devnet.truth()
    worker = WorkerProcess.start(tmp_path, db_dsn, devnet.relay_url, START_CURSOR="0")
    try:
        await wait_for_cursor(db_dsn, truth["last_seq"], worker=worker, timeout_s=90)
        conn = await asyncpg.connect(db_dsn)
        try:
            landed = await conn.fetchval(
                "SELECT count(*) FROM records WHERE uri = ANY($1::text[])", truth["forged"]
            )
        finally:
            await conn.close()
        assert landed > 0
    finally:
        if worker.proc.poll() is None:
            worker.kill9()
