"""HttpNetwork (backfill/network.py) without the network: which hosts count for the
rate-limit state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import backfill.download
from backfill.identity import Identity
from backfill.network import HttpNetwork


class FakeHttp:
    rate_limit_pauses = 0

    def __init__(self) -> None:
        # The relay and the PLC directory were asked too (listRepos, DID documents).
        self.hosts = {"relay.test:443", "plc.test:443", "pds1.test:443"}

    def known_hosts(self) -> set[str]:
        return set(self.hosts)

    def paused_hosts(self) -> dict[str, float]:
        return {"pds1.test:443": 5.0}


class FakeResolver:
    async def resolve(self, did: str) -> Identity:
        return Identity(did=did, handle=None, pds="https://PDS1.test", signing_key=None)

    def invalidate(self, did: str) -> None:
        pass


async def test_known_hosts_are_the_repo_hosts_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every host repos come from is paused -> the service reports paused_rate_limited; the
    relay and the PLC directory (never paused by a PDS 429) must not hide that."""

    async def fake_fetch(http: Any, pds: str, did: str, **kw: Any) -> str:
        return f"snapshot of {did} from {pds}"

    monkeypatch.setattr(backfill.download, "fetch_repo", fake_fetch)
    net = HttpNetwork(
        FakeHttp(), FakeResolver(), "https://relay.test", max_bytes=1 << 20, spool=tmp_path
    )
    assert net.known_hosts() == set()
    await net.fetch("did:plc:abc")
    assert net.known_hosts() == {"pds1.test:443"}
    assert net.known_hosts() <= set(net.paused_hosts())
