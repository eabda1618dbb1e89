"""The devnet relay: serves the generated event log as com.atproto.sync.subscribeRepos.

Cursor semantics follow the lexicon (com.atproto.sync.subscribeRepos) and the event stream
spec (https://atproto.com/specs/event-stream#sequence-numbers):

* no cursor: live tail only, starting with events produced after the connection;
* cursor within the retained window (including 0 when everything is retained): replay every
  event with seq > cursor, then continue live;
* cursor older than the window: one ``#info OutdatedCursor`` frame, then replay from the
  oldest retained event;
* cursor > current head: error frame ``FutureCursor``, then close.

Connection faults (each per connection, counted in `RelayStats`): `drop_every` aborts the
socket between frames; `cut_every` sends half of a frame's websocket bytes and closes the TCP
socket (no close frame); `malformed_every` / `garbage_every` add frames that are no valid
event; `silence_every` holds the socket open and sends nothing for `silence_s`. And one
relay-wide fault, `reset_seq_after`: after that many events the relay "restarts with a fresh
database": every connection is aborted, its log forgotten, and seq numbers start again at 1,
so a consumer resuming with its old cursor is answered ``FutureCursor``. The truth file stays
the final state of every repo; its `last_seq` is the head of the new seq space.

Events are produced by a background task, either as fast as possible in small chunks
(`rate` 0) or paced at `rate` events/s, until `events` exist; then connections stay open,
idle. Frames are stored encoded, so replay costs only the send. `websockets`' ``send``
waits while the client is not reading, which gives natural back-pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from firehose.devnet import frames
from firehose.devnet.faults import GarbageFrames, MalformedFrames, cut_frame
from firehose.devnet.generator import DEFAULT_START_TIME_US, Generator
from firehose.devnet.httpfaults import HttpFaults
from firehose.devnet.network import STATS_PATH, DevnetNetwork, NetworkConfig, json_bytes

log = logging.getLogger(__name__)

SUBSCRIBE_PATH = "/xrpc/com.atproto.sync.subscribeRepos"
GENERATION_CHUNK_EVENTS = 50  # events generated between yields to the event loop (rate 0)
MIN_SLEEP_S = 0.002


@dataclass(frozen=True)
class DevnetConfig:
    seed: int = 0
    accounts: int = 200
    events: int = 10_000
    rate: float = 0.0  # events/s; 0 = generate everything as fast as possible
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port (see DevnetRelay.port)
    window: int = 0  # events retained for replay; 0 = all
    drop_every: int = 0  # abort each connection after this many frames; 0 = never
    malformed_every: int = 0  # inject a malformed frame after this many real frames; 0 = never
    cut_every: int = 0  # cut the connection in the middle of every Nth frame; 0 = never
    garbage_every: int = 0  # send a garbage message after every N real frames; 0 = never
    silence_every: int = 0  # go silent (socket open) after every N frames; 0 = never
    silence_s: float = 5.0  # how long each silence lasts
    reset_seq_after: int = 0  # restart with seq reset after this many events; 0 = never
    start_time_us: int = DEFAULT_START_TIME_US
    truth_path: str | None = None  # written (atomically) once all events exist
    # History (see clock.VirtualClock): the first history_events events fall in the
    # history_days before now_us (None = the real time at start); the rest continue live.
    now_us: int | None = None
    history_days: float = 0.0
    history_events: int = 0
    # The HTTP side (see network.py): PDS hosts, PLC directory, prebuilt repos, CAR files.
    pds_hosts: int = 3
    plc_port: int = 0
    pds_port_base: int = 0
    repo_accounts: int = 0
    repo_records: int = 0
    extra_cars: tuple[str, ...] = ()
    did_web_records: int = 0
    http_faults: HttpFaults = field(default_factory=HttpFaults)
    # History half (issue 9; see model.py, pds.py, directory.py): model accounts grown over
    # the year before now_us, and the faults of servers that do not cooperate.
    history_model: str = ""  # "year" adds model_accounts accounts (see model.py)
    model_accounts: int = 0
    ignore_since: bool = False  # PDS hosts answer getRepo whole, whatever `since` says
    missing_record: str = "proof"  # getRecord of a missing record: "proof" or "not-found"
    no_list_repos_by_collection: int = 0  # 404 or 501: the relay lacks listReposByCollection

    def network_config(self) -> NetworkConfig:
        return NetworkConfig(
            host=self.host,
            pds_hosts=self.pds_hosts,
            plc_port=self.plc_port,
            pds_port_base=self.pds_port_base,
            repo_accounts=self.repo_accounts,
            repo_records=self.repo_records,
            extra_cars=self.extra_cars,
            did_web_records=self.did_web_records,
            faults=self.http_faults,
            history_model=self.history_model,
            model_accounts=self.model_accounts,
            ignore_since=self.ignore_since,
            missing_record=self.missing_record,
            no_list_repos_by_collection=self.no_list_repos_by_collection,
        )


@dataclass
class RelayStats:
    connections: int = 0
    frames_sent: int = 0  # real event frames
    malformed_sent: int = 0
    drops: int = 0  # connections aborted by drop_every
    info_sent: int = 0
    errors_sent: int = 0
    cuts: int = 0  # connections cut mid-frame by cut_every
    garbage_sent: int = 0
    silences: int = 0
    seq_resets: int = 0


class DevnetRelay:
    """``async with DevnetRelay(config) as relay:`` serves on `relay.url`; with rate 0 the
    context is entered once every event exists (so `relay.truth()` is final)."""

    def __init__(self, config: DevnetConfig | None = None) -> None:
        self.config = config or DevnetConfig()
        self.generator = Generator(
            seed=self.config.seed,
            accounts=self.config.accounts,
            start_time_us=self.config.start_time_us,
            now_us=self.config.now_us,
            history_days=self.config.history_days,
            history_events=self.config.history_events,
        )
        self.network = DevnetNetwork(self.config.network_config(), self.generator, self.config.seed)
        self.stats = RelayStats()
        self.generated = asyncio.Event()
        self._log: list[bytes] = []
        self._dropped = 0  # events trimmed from the front of the retention window
        self._wakeup = asyncio.Event()
        self._server: Server | None = None
        self._producer: asyncio.Task[None] | None = None
        self._malformed = MalformedFrames(self.config.seed)
        self._garbage = GarbageFrames(self.config.seed)
        self._connections: set[ServerConnection] = set()
        self._epoch = 0  # bumped by each seq reset: a connection of an old epoch ends

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.network.start()  # builds prebuilt repos first: seconds when big
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._route,
            compression=None,
            max_size=None,
        )
        self._producer = asyncio.create_task(self._produce(), name="devnet-producer")

    async def stop(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.network.stop()

    async def __aenter__(self) -> DevnetRelay:
        await self.start()
        if self.config.rate == 0:
            await self.wait_generated()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_generated(self) -> None:
        """Wait until all events exist; re-raises a failure of the producer."""
        assert self._producer is not None
        done, _ = await asyncio.wait(
            {self._producer, asyncio.ensure_future(self.generated.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._producer in done:
            self._producer.result()

    # ---- state ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL of the relay, e.g. ``ws://127.0.0.1:PORT`` (the worker adds the XRPC path)."""
        return f"ws://{self.config.host}:{self.port}"

    @property
    def subscribe_url(self) -> str:
        return self.url + SUBSCRIBE_PATH

    @property
    def head_seq(self) -> int:
        return self._dropped + len(self._log)

    @property
    def oldest_seq(self) -> int:
        """Seq of the oldest retained event (head + 1 when nothing has been produced)."""
        return self._dropped + 1

    def frame(self, seq: int) -> bytes:
        return self._log[seq - self._dropped - 1]

    def truth(self) -> dict[str, Any]:
        return self.network.truth(self.generator.truth())

    def write_truth(self, path: str | os.PathLike[str]) -> None:
        """Write the truth file atomically (tmp file + rename): readers never see half."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.truth(), ensure_ascii=False, separators=(",", ":")))
        os.replace(tmp, target)

    # ---- production ---------------------------------------------------------------------------

    def _append(self, frame: bytes) -> None:
        self._log.append(frame)
        window = self.config.window
        if window and len(self._log) > 2 * window:  # trim in bulk: O(1) amortised
            excess = len(self._log) - window
            del self._log[:excess]
            self._dropped += excess

    def _retained_oldest(self) -> int:
        window = self.config.window
        if window and self.head_seq - window + 1 > self.oldest_seq:
            return self.head_seq - window + 1
        return self.oldest_seq

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def _produce(self) -> None:
        total, rate = self.config.events, self.config.rate
        loop = asyncio.get_running_loop()
        started = loop.time()
        produced = 0
        while produced < total:
            if rate > 0:
                due = min(total, int((loop.time() - started) * rate) + 1)
                if due <= produced:
                    await asyncio.sleep(
                        max(MIN_SLEEP_S, (produced + 1) / rate - (loop.time() - started))
                    )
                    continue
                batch = due - produced
            else:
                batch = min(GENERATION_CHUNK_EVENTS, total - produced)
            for _ in range(batch):
                if self.config.reset_seq_after and produced == self.config.reset_seq_after:
                    self._reset_seq()
                self._append(self.generator.next_frame())
                produced += 1
            self._notify()
            await asyncio.sleep(0)
        if self.config.truth_path:
            self.write_truth(self.config.truth_path)
        self.generated.set()
        self._notify()

    def _reset_seq(self) -> None:
        """A relay restarted with a fresh database: it forgets every event it sequenced and
        numbers the next ones from 1 again. Connections die with the old process."""
        self.stats.seq_resets += 1
        self._epoch += 1
        log.warning("devnet relay restart: seq reset after %d events", self.head_seq)
        for ws in list(self._connections):
            ws.transport.abort()
        self._log.clear()
        self._dropped = 0
        self.generator.seq = 0

    # ---- serving ------------------------------------------------------------------------------

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path == SUBSCRIBE_PATH:
            return None  # the websocket handshake goes on
        answer = self.network.relay_http(request.path)
        if answer is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        # Plain HTTP on the websocket port (listRepos, stats): the backfill derives its
        # HTTP base from RELAY_URL, as with a real relay.
        status, body = answer
        if urlsplit(request.path).path == STATS_PATH:
            body = {**body, "relay": dataclasses.asdict(self.stats)}  # faults injected here
        response = connection.respond(status, "")
        response.body = json_bytes(body)
        del response.headers["Content-Length"], response.headers["Content-Type"]
        response.headers["Content-Length"] = str(len(response.body))
        response.headers["Content-Type"] = "application/json"
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        self._connections.add(ws)
        try:
            with contextlib.suppress(ConnectionClosed):  # the client went away: nothing to do
                await self._serve(ws, query.get("cursor", [None])[0])
        finally:
            self._connections.discard(ws)

    async def _serve(self, ws: ServerConnection, cursor_text: str | None) -> None:
        if cursor_text is None:
            position = self.head_seq + 1  # live tail
        else:
            try:
                cursor = int(cursor_text)
            except ValueError:
                self.stats.errors_sent += 1
                await ws.send(frames.error("InvalidRequest", "cursor must be an integer"))
                await ws.close()
                return
            if cursor > self.head_seq:
                self.stats.errors_sent += 1
                await ws.send(frames.error("FutureCursor", "cursor is ahead of the stream"))
                await ws.close()
                return
            position = cursor + 1
        sent = 0
        last_seq = 0
        epoch = self._epoch
        while True:
            if self._epoch != epoch:  # the relay "restarted": this connection is gone
                ws.transport.abort()
                return
            oldest = self._retained_oldest()
            if position < oldest:  # fell out of (or asked before) the retention window
                self.stats.info_sent += 1
                await ws.send(frames.info("OutdatedCursor", "cursor older than the window"))
                position = oldest
            if position > self.head_seq:
                if self.generated.is_set():
                    await ws.wait_closed()  # all events sent: stay connected, idle
                    return
                wakeup = asyncio.ensure_future(self._wakeup.wait())
                closed = asyncio.ensure_future(ws.wait_closed())
                await asyncio.wait({wakeup, closed}, return_when=asyncio.FIRST_COMPLETED)
                wakeup.cancel()
                closed.cancel()
                if ws.state.name == "CLOSED":
                    return
                continue
            config = self.config
            if config.cut_every and (sent + 1) % config.cut_every == 0:
                # Half of the frame's websocket bytes, then the TCP socket closes without a
                # close frame: the consumer's reader hits EOF inside a frame.
                self.stats.cuts += 1
                ws.transport.write(cut_frame(self.frame(position)))
                ws.transport.close()
                return
            await ws.send(self.frame(position))
            last_seq = position
            position += 1
            sent += 1
            self.stats.frames_sent += 1
            if config.malformed_every and sent % config.malformed_every == 0:
                _, bad = self._malformed.next_frame(last_seq)
                self.stats.malformed_sent += 1
                await ws.send(bad)
            if config.garbage_every and sent % config.garbage_every == 0:
                _, garbage = self._garbage.next_frame()
                self.stats.garbage_sent += 1
                await ws.send(garbage)
            if config.drop_every and sent % config.drop_every == 0:
                self.stats.drops += 1
                ws.transport.abort()  # abrupt: no close frame, like a dying relay
                return
            if config.silence_every and sent % config.silence_every == 0:
                # Alive but mute (a wedged relay): the socket stays open, nothing is sent.
                self.stats.silences += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.wait_closed(), config.silence_s)
                if ws.state.name == "CLOSED":
                    return
