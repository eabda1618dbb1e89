"""The devnet relay over a real websocket: cursor semantics, faults, and the CLI process."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import libipld
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from firehose.devnet.faults import FAKE_DID, KINDS
from firehose.devnet.relay import DevnetConfig, DevnetRelay

RECV_TIMEOUT_S = 10


def decode(frame: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return header, body


def subscribe(url: str) -> connect:
    # max_queue=None: when the test stops reading early and closes, the client must still
    # read past the frames in flight to see the server's close frame (else a 10 s timeout).
    return connect(url, max_size=None, max_queue=None, close_timeout=2)


async def recv(ws: ClientConnection) -> bytes:
    message = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
    assert isinstance(message, bytes)
    return message


async def test_replay_from_zero_then_idle() -> None:
    async with DevnetRelay(DevnetConfig(seed=3, accounts=10, events=300)) as relay:
        assert relay.head_seq == 300 and relay.truth()["last_seq"] == 300
        async with subscribe(relay.subscribe_url + "?cursor=0") as ws:
            received = [await recv(ws) for _ in range(300)]
            assert received == [relay.frame(seq) for seq in range(1, 301)]
            assert [decode(f)[1]["seq"] for f in received] == list(range(1, 301))
            with pytest.raises(TimeoutError):  # all sent: the connection stays open, idle
                await asyncio.wait_for(ws.recv(), 0.3)
        async with subscribe(relay.subscribe_url + "?cursor=250") as ws:
            assert decode(await recv(ws))[1]["seq"] == 251
        assert relay.stats.connections == 2 and relay.stats.frames_sent == 350


async def test_live_tail_without_cursor() -> None:
    config = DevnetConfig(seed=4, accounts=10, events=100_000, rate=200)
    async with DevnetRelay(config) as relay:
        await asyncio.sleep(0.2)
        async with subscribe(relay.subscribe_url) as ws:
            head_at_connect = relay.head_seq
            first = decode(await recv(ws))[1]["seq"]
            second = decode(await recv(ws))[1]["seq"]
            assert head_at_connect < first and second == first + 1
        assert 0 < relay.head_seq < 1000  # paced, not everything at once


async def test_outdated_cursor_and_future_cursor() -> None:
    config = DevnetConfig(seed=5, accounts=10, events=500, window=100)
    async with DevnetRelay(config) as relay:
        async with subscribe(relay.subscribe_url + "?cursor=10") as ws:
            header, body = decode(await recv(ws))
            assert header == {"op": 1, "t": "#info"} and body["name"] == "OutdatedCursor"
            assert decode(await recv(ws))[1]["seq"] == 401  # oldest retained
        async with subscribe(relay.subscribe_url + "?cursor=0") as ws:
            assert decode(await recv(ws))[1]["name"] == "OutdatedCursor"
        async with subscribe(relay.subscribe_url + "?cursor=450") as ws:
            assert decode(await recv(ws))[1]["seq"] == 451  # in range: no #info
        async with subscribe(relay.subscribe_url + "?cursor=9999") as ws:
            header, body = decode(await recv(ws))
            assert header == {"op": -1} and body["error"] == "FutureCursor"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)


async def test_unknown_path_is_404() -> None:
    async with DevnetRelay(DevnetConfig(accounts=3, events=10)) as relay:
        with pytest.raises(Exception, match="404"):
            async with connect(relay.url + "/xrpc/other"):
                pass


async def test_drop_every_aborts_and_cursor_resumes() -> None:
    config = DevnetConfig(seed=6, accounts=10, events=120, drop_every=50)
    async with DevnetRelay(config) as relay:
        cursor, seqs, connections = 0, [], 0
        while cursor < 120:
            connections += 1
            async with subscribe(f"{relay.subscribe_url}?cursor={cursor}") as ws:
                try:
                    while cursor < 120:
                        cursor = decode(await recv(ws))[1]["seq"]
                        seqs.append(cursor)
                except ConnectionClosedError:
                    pass  # abrupt: no close frame
        assert seqs == list(range(1, 121))
        assert connections == 3 and relay.stats.drops == 2


async def test_malformed_frames_rotate_and_leave_truth_alone() -> None:
    config = DevnetConfig(seed=8, accounts=10, events=200, malformed_every=10)
    async with DevnetRelay(config) as relay:
        truth = relay.truth()
        good: list[int] = []
        bad: list[tuple[str, Any]] = []
        async with subscribe(relay.subscribe_url + "?cursor=0") as ws:
            while len(good) < 200:
                frame = await recv(ws)
                try:
                    header, body = decode(frame)
                except ValueError:
                    bad.append(("undecodable", frame))
                    continue
                if header.get("op") != 1 or body.get("repo") == FAKE_DID:
                    bad.append((str(header), body))
                    continue
                good.append(body["seq"])
            bad.append(("last", await recv(ws)))  # the one injected after frame 200
        assert good == list(range(1, 201))
        assert len(bad) == 20 and relay.stats.malformed_sent == 20
        assert FAKE_DID not in truth["statuses"]
        # the fake commits carry the seq of the real frame just before them
        commits = [b for h, b in bad if isinstance(b, dict) and "blocks" in b]
        assert commits and all(b["seq"] % 10 == 0 for b in commits)
        assert len(KINDS) == 5


async def test_cli_process_serves_and_writes_truth(tmp_path: Path) -> None:
    truth_path = tmp_path / "truth.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firehose.devnet",
        "--seed=9",
        "--accounts=12",
        "--events=250",
        f"--truth={truth_path}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"ws://127\.0\.0\.1:\d+", line)
        assert match, line
        url = match.group(0) + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
        async with subscribe(url) as ws:
            seqs = [decode(await recv(ws))[1]["seq"] for _ in range(250)]
        assert seqs == list(range(1, 251))
        for _ in range(100):
            if truth_path.exists():
                break
            await asyncio.sleep(0.1)
        truth = json.loads(truth_path.read_text())
        assert truth["last_seq"] == 250 and truth["records"]
        live_keys = {"last_seq", "records", "deleted", "handles", "statuses"}
        assert set(truth) == live_keys | {"record_times", "now_us", "hosts", "history"}
    finally:
        process.terminate()
        await process.wait()
