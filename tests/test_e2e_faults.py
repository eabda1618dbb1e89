"""Fault injection, end to end: relay faults, a PostgreSQL outage and kill -9, each against
real processes (devnet, worker, PostgreSQL); after each the tables equal the devnet's truth.

First the devnet's fault flags themselves, over a real websocket (what a consumer sees);
then the worker against them. Every scenario prints what was injected and survived (run
with `-s` to see the lines; README "Faults survived" quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import libipld
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from firehose.devnet import DevnetConfig, DevnetRelay
from firehose.devnet.faults import GARBAGE_KINDS

RECV_TIMEOUT_S = 10


def seq_of(message: bytes | str) -> int | None:
    """The seq of a real event frame, None for anything else (garbage, errors)."""
    if not isinstance(message, bytes):
        return None
    try:
        header, body = libipld.decode_dag_cbor_multi(message)
    except Exception:
        return None
    if not isinstance(header, dict) or header.get("op") != 1 or not isinstance(body, dict):
        return None
    seq = body.get("seq")
    return seq if isinstance(seq, int) else None


async def read_until_closed(url: str, limit_s: float = RECV_TIMEOUT_S) -> list[bytes | str]:
    messages: list[bytes | str] = []
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with connect(url, max_size=None, max_queue=None, close_timeout=1) as ws:
            while True:
                messages.append(await asyncio.wait_for(ws.recv(), limit_s))
    return messages


# ---- the devnet's faults, as a consumer sees them ---------------------------------------------


async def test_devnet_cut_mid_frame_then_resume() -> None:
    config = DevnetConfig(seed=5, accounts=10, events=60, cut_every=25)
    async with DevnetRelay(config) as relay:
        first = await read_until_closed(relay.subscribe_url + "?cursor=0")
        seqs = [seq_of(m) for m in first]
        # 24 whole frames, then the 25th cut: the client library sees a broken connection.
        assert seqs == list(range(1, 25))
        again = await read_until_closed(relay.subscribe_url + "?cursor=24")
        assert [seq_of(m) for m in again] == list(range(25, 49))
        assert relay.stats.cuts == 2


async def test_devnet_garbage_is_never_an_event() -> None:
    config = DevnetConfig(seed=6, accounts=10, events=40, garbage_every=4)
    async with DevnetRelay(config) as relay:
        got: list[bytes | str] = []
        async with connect(relay.subscribe_url + "?cursor=0", max_size=None) as ws:
            while sum(seq_of(m) is not None for m in got) < 40:
                got.append(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
            got.append(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))  # the last garbage
        real = [seq_of(m) for m in got if seq_of(m) is not None]
        assert real == list(range(1, 41))
        garbage = [m for m in got if seq_of(m) is None]
        assert len(garbage) == 10 == relay.stats.garbage_sent
        assert any(isinstance(m, str) for m in garbage) and b"" in garbage
        assert len(GARBAGE_KINDS) == 5


async def test_devnet_silence_keeps_the_socket_open() -> None:
    config = DevnetConfig(seed=7, accounts=10, events=30, silence_every=10, silence_s=1.0)
    async with DevnetRelay(config) as relay:
        async with connect(relay.subscribe_url + "?cursor=0", max_size=None) as ws:
            for _ in range(10):
                await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.6)  # silent, not closed
            assert seq_of(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)) == 11
            assert loop.time() - started >= 0.9
        assert relay.stats.silences >= 1


async def test_devnet_seq_reset_answers_future_cursor() -> None:
    config = DevnetConfig(seed=8, accounts=10, events=100, rate=400, reset_seq_after=60)
    async with DevnetRelay(config) as relay:
        before: list[Any] = []
        with contextlib.suppress(ConnectionClosed):
            async with connect(relay.subscribe_url + "?cursor=0", max_size=None) as ws:
                while True:
                    before.append(seq_of(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)))
        # The old relay died after its 60th event: the connection was aborted.
        assert before == list(range(1, 61))
        assert relay.stats.seq_resets == 1 and relay.head_seq < 60
        answer = await read_until_closed(relay.subscribe_url + "?cursor=60", 2)
        assert len(answer) == 1
        header, body = libipld.decode_dag_cbor_multi(answer[0])
        assert header == {"op": -1} and body["error"] == "FutureCursor"
        await relay.wait_generated()
        truth = relay.truth()
        assert truth["last_seq"] == 40 == relay.head_seq  # the new seq space
        replay = await read_until_closed(relay.subscribe_url + "?cursor=0", 0.5)
        assert [seq_of(m) for m in replay] == list(range(1, 41))
