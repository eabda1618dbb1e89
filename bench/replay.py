"""A frame cache and a tiny replay relay for the live benchmark.

Generating signed devnet traffic costs ~0.6 ms per event, so a 200k-event run spent two
minutes generating before measuring anything. The frames are deterministic for (events,
accounts, seed), so they are generated once into a cache file and
served from it by this module running as a subprocess:

    python bench/replay.py --events N --accounts A --seed S [--port 0]

prints ``replay relay listening on ws://HOST:PORT`` once it serves. It speaks just enough
of RFC 6455 for `com.atproto.sync.subscribeRepos`: the upgrade handshake, replay of every
frame with seq > ``cursor`` (pre-framed, written in large chunks with flow control, so the
relay costs almost no CPU and the benchmark measures the worker, as against a remote relay),
answers to pings and a close handshake. The devnet relay (`firehose devnet`) stays the
reference server: the tests and `bench/live.py --no-cache` use it.

Cache file: ``u32 big-endian length + frame`` repeated; frame *i* (0-based) has seq i+1, as
in the devnet's event log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import mmap
import struct
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "bench" / "out" / "frames"  # bench/out/ is git-ignored
FRAMES_PER_WRITE = 256  # ~0.5 MB per transport write; drain() keeps the buffer bounded
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_LEN = struct.Struct(">I")


def cache_path(events: int, accounts: int, seed: int) -> Path:
    """Cache file for these arguments. Keyed by the arguments only, not by the devnet's
    source (which other work edits often): after a change to the generator that matters,
    delete bench/out/frames/."""
    return CACHE_DIR / f"frames-e{events}-a{accounts}-s{seed}.bin"


def ensure_cache(events: int, accounts: int, seed: int) -> Path:
    path = cache_path(events, accounts, seed)
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT))
    from firehose.devnet.generator import Generator

    generator = Generator(seed=seed, accounts=accounts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for _ in range(events):
            frame = generator.next_frame()
            out.write(_LEN.pack(len(frame)) + frame)
    tmp.replace(path)
    return path


def read_frames(path: Path, limit: int | None = None) -> list[bytes]:
    frames: list[bytes] = []
    with path.open("rb") as f:
        while limit is None or len(frames) < limit:
            head = f.read(4)
            if len(head) < 4:
                break
            frames.append(f.read(_LEN.unpack(head)[0]))
    return frames


def _ws_header(opcode: int, n: int) -> bytes:
    """Header of an unmasked (server -> client) final frame of `n` payload bytes."""
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 1 << 16:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")


class Replay:
    def __init__(self, path: Path) -> None:
        # The cache file is mapped, not read: 200k frames are ~400 MB. Each frame is framed
        # as a binary websocket message on the fly, a chunk of frames per write.
        with path.open("rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.spans: list[tuple[int, int]] = []  # (start, end) of frame seq i+1
        pos = 0
        while pos < len(self.data):
            (n,) = _LEN.unpack_from(self.data, pos)
            self.spans.append((pos + 4, pos + 4 + n))
            pos += 4 + n

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            lines = request.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            key = headers["sec-websocket-key"].encode()
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            )
            cursor = int(parse_qs(urlsplit(path).query).get("cursor", ["0"])[0])
            control = asyncio.create_task(self._control(reader, writer))
            data, spans = self.data, self.spans
            for first in range(max(cursor, 0), len(spans), FRAMES_PER_WRITE):
                if control.done():
                    break
                parts: list[bytes] = []
                for start, end in spans[first : first + FRAMES_PER_WRITE]:
                    parts.append(_ws_header(0x2, end - start))
                    parts.append(data[start:end])
                writer.write(b"".join(parts))
                await writer.drain()
            await control  # every frame sent: stay connected until the client closes
        except (ConnectionError, asyncio.IncompleteReadError, KeyError, IndexError, ValueError):
            pass
        finally:
            writer.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the client's (masked) frames: answer pings, echo a close and stop."""
        while True:
            head = await reader.readexactly(2)
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            mask = await reader.readexactly(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(n)))
            if opcode == _OP_PING:
                writer.write(_ws_header(_OP_PONG, len(payload)) + payload)
            elif opcode == _OP_CLOSE:
                writer.write(_ws_header(_OP_CLOSE, len(payload[:2])) + payload[:2])
                await writer.drain()
                return


async def serve(path: Path, host: str, port: int) -> None:
    replay = Replay(path)
    server = await asyncio.start_server(replay.handle, host, port)
    bound = server.sockets[0].getsockname()
    print(f"replay relay listening on ws://{bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--accounts", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    path = ensure_cache(args.events, args.accounts, args.seed)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(path, args.host, args.port))


if __name__ == "__main__":
    main()
