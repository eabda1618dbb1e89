"""The relay client against a real websockets server: resume, backoff, idle, error frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_protocol_support import FIXTURES, frame
from websockets.asyncio.server import ServerConnection, serve

from firehose.devnet import frames as dev_frames
from firehose.devnet.faults import cut_frame
from firehose.live.relay import RelayClient, subscribe_url
from firehose.metrics import LiveMetrics
from firehose.model import Batch, ErrorFrame, IdentityEvent, IgnoredEvent, InfoEvent
from firehose.protocol.frames import decode_frame
from firehose.settings import RelaySettings
from firehose.storage.writer import apply_batch, load_cursor, save_cursor

SCENARIOS = FIXTURES / "indigo/cmd/relay/testing/testdata"
DID = "did:plc:44ybard66vv44zksje25o7dz"

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
    assert relay.observe(IgnoredEvent(101, "#x"))
    assert not relay.observe(IgnoredEvent(99, "#x"))  # backwards on the connection: dropped
    assert relay.observe(IgnoredEvent(105, "#x"))  # a jump forward is kept
    relay.observe(InfoEvent("OutdatedCursor", "too old"))
    assert metrics.seq_anomalies.labels("backwards")._value.get() == 1
    assert metrics.seq_anomalies.labels("outdated_cursor")._value.get() == 1
    assert relay.cursor == 105  # the dropped seq did not move the resume point back


def _frames_of(name: str) -> list[tuple[bytes, dict[str, Any]]]:
    scenario = json.loads((SCENARIOS / f"{name}.json").read_text())
    return [(frame(m["frame"]["header"], m["frame"]["body"]), m) for m in scenario["messages"]]


async def test_seq_ordering_scenario_drops_over_a_real_socket() -> None:
    """indigo's seq_ordering.json: the relay's expected `drop` of every message whose seq does
    not increase (a repeated 1000, then 5), and the commit re-sent as seq 2000 kept."""
    messages = _frames_of("seq_ordering")

    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        for data, _ in messages:
            await ws.send(data)
        await ws.wait_closed()

    kept: list[bool] = []
    async with relay_server(handler) as (url, _):
        relay, metrics = client(url)
        stop = asyncio.Event()
        async for data in relay.frames(stop):
            kept.append(relay.observe(decode_frame(data)))
            if len(kept) == len(messages):
                stop.set()
    assert kept == [not m["drop"] for _, m in messages]
    assert kept == [True, False, False, True]  # not vacuous
    assert metrics.seq_anomalies.labels("backwards")._value.get() == 2
    assert relay.cursor == 2000


async def test_future_cursor_accepts_the_new_seq_space() -> None:
    """A relay restarted with its seq reset: our cursor is in its future, it says
    FutureCursor; we resume from its live tip and follow the new, lower numbers."""

    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        if cursor is None and not served:
            seqs = [100, 101, 102]  # the old relay, then it dies
        elif cursor is not None and cursor > 3:
            await ws.send(dev_frames.error("FutureCursor", "cursor is ahead of the stream"))
            await ws.close()
            return
        else:
            seqs = [1, 2, 3]  # the restarted relay, from its live tip
        served.append(seqs)
        for seq in seqs:
            await ws.send(dev_frames.identity(seq, DID, "2025-01-01T00:00:00.000Z", None))
        if seqs[0] == 100:
            return  # abrupt end of the old relay
        await ws.wait_closed()

    served: list[list[int]] = []
    async with relay_server(handler) as (url, cursors):
        relay, metrics = client(url)
        stop = asyncio.Event()
        seen: list[int] = []
        async for data in relay.frames(stop):
            event = decode_frame(data)
            if relay.observe(event) and isinstance(event, IdentityEvent):
                seen.append(event.seq)
            if len(seen) == 6:
                stop.set()
    assert seen == [100, 101, 102, 1, 2, 3]
    assert cursors == [None, 102, None]
    assert relay.cursor == 3  # the resume point went down with the relay
    assert metrics.seq_anomalies.labels("future_cursor")._value.get() == 1
    assert metrics.reconnects.labels("future_cursor")._value.get() == 1


async def test_lower_seqs_at_connection_start_are_a_reset_not_a_drop() -> None:
    """A relay that answers our cursor with lower seqs (its numbering restarted without a
    FutureCursor): the first event starts the new space, later repeats on that connection
    are still dropped, so the client can never be stuck dropping forever."""

    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        seqs = [50, 51] if cursor is None else [7, 8, 8, 9]
        for seq in seqs:
            await ws.send(seq.to_bytes(4, "big"))
        if cursor is None:
            return
        await ws.wait_closed()

    async with relay_server(handler) as (url, _):
        relay, metrics = client(url)
        stop = asyncio.Event()
        kept: list[int] = []
        async for data in relay.frames(stop):
            seq = int.from_bytes(data, "big")
            if relay.observe(IgnoredEvent(seq, "#test")):
                kept.append(seq)
            if seq == 9:
                stop.set()
    assert kept == [50, 51, 7, 8, 9]
    assert metrics.seq_anomalies.labels("reset")._value.get() == 1
    assert metrics.seq_anomalies.labels("backwards")._value.get() == 1


async def test_cut_mid_frame_and_garbage_do_not_stop_the_client() -> None:
    """Half a websocket frame then a closed TCP socket (no close frame), a text message and
    binary noise: the half frame is never yielded, the client resumes from the last seq."""

    async def handler(ws: ServerConnection, cursor: int | None) -> None:
        start = (cursor or 0) + 1
        await ws.send("a text message: not part of the protocol")
        await ws.send(start.to_bytes(4, "big"))
        if cursor is None:
            ws.transport.write(cut_frame((start + 1).to_bytes(4, "big") * 1000))
            ws.transport.close()
            return
        await ws.send(b"\xff" * 7)
        await ws.send((start + 1).to_bytes(4, "big"))
        await ws.wait_closed()

    async with relay_server(handler) as (url, cursors):
        relay, metrics = client(url)
        stop = asyncio.Event()
        got: list[bytes] = []
        async for data in relay.frames(stop):
            got.append(data)
            if len(data) == 4:
                relay.observe(IgnoredEvent(int.from_bytes(data, "big"), "#test"))
            if relay.cursor == 3:
                stop.set()
    assert got == [
        (1).to_bytes(4, "big"),
        (2).to_bytes(4, "big"),
        b"\xff" * 7,
        (3).to_bytes(4, "big"),
    ]
    assert cursors == [None, 1]
    assert sum(metrics.reconnects.labels(r)._value.get() for r in ("closed", "error")) == 1


async def test_saved_cursor_may_go_down_after_a_seq_reset(conn: asyncpg.Connection) -> None:
    """The cursor statements have no never-backwards guard (on purpose: after FutureCursor
    the relay's old numbers are meaningless); a batch with a lower cursor saves it."""
    await apply_batch(conn, Batch(cursor=5000, events=1), heads=[])
    assert await load_cursor(conn, "firehose") == 5000
    await apply_batch(conn, Batch(cursor=12, events=1), heads=[])
    assert await load_cursor(conn, "firehose") == 12
    await save_cursor(conn, "firehose", 3, None)
    assert await load_cursor(conn, "firehose") == 3


@settings(max_examples=300, deadline=None)
@given(
    start=st.one_of(st.none(), st.integers(0, 1000)),
    seqs=st.lists(st.integers(0, 1200), max_size=60),
)
def test_seq_rule_property(start: int | None, seqs: list[int]) -> None:
    """On one connection, whatever the relay sends: the kept seqs strictly increase, an event
    is dropped exactly when its seq is not above the last kept one, and the resume cursor
    is the last kept seq (the resume point never moves back within a connection)."""
    relay, metrics = client("ws://127.0.0.1:9", start=start)
    kept: list[int] = []
    for seq in seqs:
        expected = not kept or seq > kept[-1]
        assert relay.observe(IgnoredEvent(seq, "#x")) is expected
        if expected:
            kept.append(seq)
        assert relay.cursor == (kept[-1] if kept else start)
    assert kept == sorted(set(kept))
    assert metrics.seq_anomalies.labels("backwards")._value.get() == len(seqs) - len(kept)
