"""The network side end to end against the devnet's HTTP side (relay listRepos, PLC, PDSes):
every active repo enumerated, resolved and downloaded equals the devnet's truth, through a
per-host rate limit and truncated CARs (transient, retried)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from support import DevnetProcess

from backfill.download import RepoSnapshot, fetch_repo
from backfill.hosts import FetchError, HostClient
from backfill.identity import IdentityResolver
from backfill.relay_http import list_repos, relay_http_base
from backfill.window import Window
from firehose.model import RecordWrite

PLC_LINE = re.compile(r"PLC directory on (http://\S+)")
MAX_ATTEMPTS = 8


@pytest.mark.slow
async def test_backfill_network_side_against_devnet(tmp_path: Path) -> None:
    devnet = DevnetProcess.start(
        tmp_path,
        *("--accounts", "20", "--events", "300", "--repo-accounts", "3"),
        *("--repo-records", "300", "--did-web-records", "5"),
        *("--rate-limit", "4/1", "--truncate-car", "0:3"),
    )
    try:
        plc_match = PLC_LINE.search((tmp_path / "devnet.log").read_text())
        assert plc_match is not None
        truth = devnet.truth()
        async with aiohttp.ClientSession() as session:
            http = HostClient(session, per_host_concurrency=2, allow_private=True)
            resolver = IdentityResolver(http, plc_match.group(1))
            base = relay_http_base(devnet.url)
            dids: list[str] = []
            cursor: str | None = None
            while True:
                page = await list_repos(http, base, cursor, limit=7)
                assert page.invalid == 0
                dids += [ref.did for ref in page.repos if ref.active]
                if page.cursor is None:
                    break
                cursor = page.cursor
            active = {did for did, status in truth["statuses"].items() if status == "active"}
            assert set(dids) == active
            assert any(did.startswith("did:web:") for did in dids)

            async def fetch(did: str) -> RepoSnapshot:
                for _attempt in range(MAX_ATTEMPTS):
                    try:
                        ident = await resolver.resolve(did)
                        return await fetch_repo(
                            http, ident.pds, did, max_bytes=64 << 20, spool_dir=tmp_path / "spool"
                        )
                    except FetchError as exc:
                        assert exc.transient, exc
                        await asyncio.sleep(min(exc.retry_after_s or 0.05, 2))
                raise AssertionError(f"{did}: no success in {MAX_ATTEMPTS} attempts")

            snapshots = await asyncio.gather(*(fetch(did) for did in dids))
            got: dict[str, str] = {}
            for snap in snapshots:
                with snap:
                    for item in snap.writes(Window(None)):
                        assert isinstance(item, RecordWrite), item
                        assert item.cid is not None
                        got[item.uri] = item.cid
        expected = {
            uri: cid for uri, cid in truth["records"].items() if uri.split("/")[2] in active
        }
        assert got == expected
        waits, pauses = http.rate_limit_waits, http.rate_limit_pauses
        print(f"\nrequests {http.requests}, rate-limit waits {waits}, 429s {pauses}")
        assert http.rate_limit_waits > 0  # the RateLimit headers slowed us down
        assert http.rate_limit_pauses == 0  # ... before any 429
    finally:
        devnet.stop()
