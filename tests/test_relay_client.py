"""The relay client against a real websockets server: resume, backoff, idle, error frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, serve

from firehose.live.relay import RelayClient, subscribe_url
from firehose.metrics import LiveMetrics
from firehose.model import ErrorFrame, IgnoredEvent, InfoEvent
from firehose.settings import RelaySettings

Handler = Callable[[ServerConnection, int | None], Awaitable[None]]


@asynccontextmanager
async def relay_server(handler: Handler) -> AsyncIterator[tuple[str, list[int | None]]]:
    cursors: list[int | None] = []

    async def on_connect(ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        cursors.append(cursor)
        await handler(ws, cursor)

    async with serve(on_connect, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", cursors


def client(url: str, start: int | None = None, **kw: float) -> tuple[RelayClient, LiveMetrics]:
    settings = RelaySettings(url=url, start_cursor=None, reconnect_min_s=0.05, **kw)
    metrics = LiveMetrics.create(CollectorRegistry())
    return RelayClient(settings, metrics, start), metrics


def test_subscribe_url() -> None:
    assert subscribe_url("wss://bsky.network", None) == (
        "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
    )
    assert subscribe_url("ws://127.0.0.1:1/", 5).endswith("subscribeRepos?cursor=5")


async def test_resumes_from_last_read_seq_after_drop() -> None:
    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        start = (cursor or 0) + 1
        for seq in range(start, start + 3):  # three frames, then an abrupt close
            await ws.send(seq.to_bytes(4, "big"))

    async with relay_server(handler) as (url, cursors):
        relay, metrics = client(url, start=10)
        stop = asyncio.Event()
        seen: list[int] = []
        async for frame in relay.frames(stop):
            seq = int.from_bytes(frame, "big")
            relay.observe(IgnoredEvent(seq, "#test"))
            seen.append(seq)
            if len(seen) == 9:
                stop.set()
    assert seen == list(range(11, 20))
    assert cursors[:3] == [10, 13, 16]
    assert metrics.reconnects.labels("closed")._value.get() >= 2


async def test_silent_socket_is_dead() -> None:
    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        if cursor is None:
            await ws.wait_closed()  # silent: never sends
        else:
            await ws.send(b"x")
            await ws.wait_closed()

    async with relay_server(handler) as (url, cursors):
        relay, metrics = client(url, idle_timeout_s=1.2)
        stop = asyncio.Event()
        relay.observe(IgnoredEvent(1, "#test"))  # second connection carries a cursor
        relay.cursor = None
        got = []

        async def consume() -> None:
            async for frame in relay.frames(stop):
                got.append(frame)
                stop.set()

        relay_task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        relay.cursor = 1  # the idle connection started without a cursor
        await asyncio.wait_for(relay_task, 10)
    assert got == [b"x"]
    assert metrics.reconnects.labels("idle")._value.get() == 1
    assert cursors == [None, 1]


async def test_future_cursor_resumes_from_live_and_too_slow_from_cursor() -> None:
    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        await ws.send(b"frame")
        await ws.wait_closed()

    async with relay_server(handler) as (url, cursors):
        relay, metrics = client(url, start=500)
        stop = asyncio.Event()
        n = 0
        async for _ in relay.frames(stop):
            n += 1
            if n == 1:
                relay.observe(ErrorFrame("FutureCursor", "cursor in the future"))
            elif n == 2:
                relay.observe(IgnoredEvent(7, "#test"))
                relay.observe(ErrorFrame("ConsumerTooSlow"))
            else:
                stop.set()
    assert cursors == [500, None, 7]
    assert metrics.reconnects.labels("future_cursor")._value.get() == 1
    assert metrics.reconnects.labels("consumer_too_slow")._value.get() == 1


async def test_refused_connection_backs_off_and_stops() -> None:
    relay, metrics = client("ws://127.0.0.1:9", reconnect_max_s=0.2)
    stop = asyncio.Event()

    async def consume() -> None:
        async for _ in relay.frames(stop):
            pytest.fail("no frames expected")

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert metrics.reconnects.labels("refused")._value.get() >= 2


def test_seq_anomalies_counted() -> None:
    relay, metrics = client("ws://127.0.0.1:9", start=100)
    relay.observe(IgnoredEvent(101, "#x"))
    relay.observe(IgnoredEvent(99, "#x"))
    relay.observe(InfoEvent("OutdatedCursor", "too old"))
    assert metrics.seq_anomalies.labels("backwards")._value.get() == 1
    assert metrics.seq_anomalies.labels("outdated_cursor")._value.get() == 1
    assert relay.cursor == 99
