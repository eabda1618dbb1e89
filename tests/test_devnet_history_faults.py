"""The devnet PDS hosts' HTTP faults and request accounting, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from firehose.devnet.httpfaults import SERVER_ERRORS, HttpFaults, Trigger
from firehose.devnet.relay import DevnetConfig, DevnetRelay

RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")


@asynccontextmanager
async def devnet(**faults: Any) -> AsyncIterator[tuple[DevnetRelay, aiohttp.ClientSession]]:
    config = DevnetConfig(
        seed=31,
        accounts=8,
        events=150,
        pds_hosts=2,
        repo_accounts=6,
        repo_records=30,
        http_faults=HttpFaults.parse(**faults),
    )
    async with DevnetRelay(config) as relay, aiohttp.ClientSession() as http:
        yield relay, http


def car_sections_complete(data: bytes) -> bool:
    """Whether every varint-length-prefixed section of a CAR is whole (header included)."""
    pos = 0
    while pos < len(data):
        length = shift = 0
        while True:
            if pos >= len(data):
                return False
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos += length
    return pos == len(data)


def active_dids(relay: DevnetRelay, host: int) -> list[str]:
    truth = relay.truth()
    url = relay.network.pds_urls[host]
    return [d for d, u in truth["hosts"].items() if u == url and truth["statuses"][d] == "active"]


async def get_repo(
    relay: DevnetRelay, http: aiohttp.ClientSession, host: int, did: str
) -> tuple[int, dict[str, str], bytes]:
    url = relay.network.pds_urls[host] + "/xrpc/com.atproto.sync.getRepo"
    async with http.get(url, params={"did": did}) as response:
        return response.status, dict(response.headers), await response.read()


async def test_rate_limit_headers_then_429() -> None:
    async with devnet(rate_limit=["0:3/60"]) as (relay, http):
        did = active_dids(relay, 0)[0]
        remaining = []
        for _ in range(3):
            status, headers, _ = await get_repo(relay, http, 0, did)
            assert status == 200 and headers["RateLimit-Limit"] == "3"
            assert headers["RateLimit-Policy"] == "3;w=60"
            assert time.time() < int(headers["RateLimit-Reset"]) <= time.time() + 61
            remaining.append(headers["RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        status, headers, body = await get_repo(relay, http, 0, did)
        assert status == 429 and b"RateLimitExceeded" in body
        assert all(name in headers for name in RATE_HEADERS) and int(headers["Retry-After"]) >= 1
        status, headers, _ = await get_repo(relay, http, 1, active_dids(relay, 1)[0])
        assert status == 200 and "RateLimit-Limit" not in headers  # host 1 has no limit


async def test_429_without_headers() -> None:
    async with devnet(rate_limit=["1/60"], without_headers=True) as (relay, http):
        did = active_dids(relay, 1)[0]
        assert (await get_repo(relay, http, 1, did))[0] == 200
        status, headers, _ = await get_repo(relay, http, 1, did)
        assert status == 429
        assert not any(name in headers for name in (*RATE_HEADERS, "Retry-After"))


async def test_storm_every_second_request_and_5xx() -> None:
    async with devnet(storm_429=["1:2"], fail_5xx=["0:1"]) as (relay, http):
        did = active_dids(relay, 1)[0]
        statuses = [(await get_repo(relay, http, 1, did))[0] for _ in range(4)]
        assert statuses == [200, 429, 200, 429]
        for _ in range(4):
            status, _, body = await get_repo(relay, http, 0, active_dids(relay, 0)[0])
            assert status in SERVER_ERRORS and b"InternalServerError" in body


async def test_slow_host_and_truncated_car() -> None:
    async with devnet(slow_host=["1:150"], truncate_car=["0:1"]) as (relay, http):
        started = time.monotonic()
        assert (await get_repo(relay, http, 1, active_dids(relay, 1)[0]))[0] == 200
        assert time.monotonic() - started >= 0.15
        did = active_dids(relay, 0)[0]
        status, _, body = await get_repo(relay, http, 0, did)
        full = relay.generator.by_did[did].repo.full_car()
        assert status == 200 and len(body) < len(full) and full.startswith(body)
        assert car_sections_complete(full) and not car_sections_complete(body)
        stats = relay.network.stats_json()["hosts"][0]
        assert stats["get_repo"][did] == 1 and did not in stats["get_repo_ok"]


async def test_inflight_counts_and_stats_endpoint() -> None:
    async with devnet(slow_host=["200"]) as (relay, http):
        host0, host1 = active_dids(relay, 0), active_dids(relay, 1)
        assert len(host0) >= 3 and len(host1) >= 2
        requests = [get_repo(relay, http, 0, did) for did in host0[:3]]
        requests += [get_repo(relay, http, 1, did) for did in host1[:2]]
        requests.append(get_repo(relay, http, 0, host0[0]))  # the same repo twice
        results = await asyncio.gather(*requests)
        assert all(status == 200 for status, _, _ in results)
        stats_url = relay.url.replace("ws://", "http://") + "/devnet/stats"
        async with http.get(stats_url) as response:
            stats = await response.json()
        # The relay's port adds its own fault counters (`relay`) to the network's stats.
        assert stats.pop("relay")["cuts"] == 0
        assert stats == relay.network.stats_json()
        assert stats["max_inflight"] == 6 and stats["inflight"] == 0
        hosts = stats["hosts"]
        assert [h["max_inflight"] for h in hosts] == [4, 2]
        assert hosts[0]["get_repo"][host0[0]] == 2 and hosts[0]["get_repo_ok"][host0[0]] == 2
        assert hosts[1]["get_repo"] == {did: 1 for did in sorted(host1[:2])}
        assert hosts[0]["statuses"] == {"200": 4}


def test_fault_parsing_and_determinism() -> None:
    faults = HttpFaults.parse(storm_429=["0.5", "1:3"], slow_host=["2:40"], rate_limit=["5/1.5"])
    host0, host1 = faults.for_host(0, seed=1), faults.for_host(1, seed=1)
    assert host0.storm_429 == Trigger(probability=0.5) and host1.storm_429 == Trigger(every=3)
    assert faults.for_host(2, seed=1).slow_ms == 40 and host0.slow_ms == 0
    assert host0.rate_limit == (5, 1.5)
    again = faults.for_host(0, seed=1)
    draws = [host0.storm_429.fires(i, host0.rng("storm")) for i in range(1, 50)]
    assert draws == [again.storm_429.fires(i, again.rng("storm")) for i in range(1, 50)]
    assert 5 < sum(draws) < 45
    with pytest.raises(ValueError):
        HttpFaults.parse(rate_limit=["lots"])
    with pytest.raises(ValueError):
        Trigger.parse("1.5")
