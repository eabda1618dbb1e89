"""Command-line entry points: `firehose devnet ...` (via firehose/cli.py) and
`python -m firehose.devnet ...`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from datetime import UTC, datetime

from firehose.devnet.generator import DEFAULT_START_TIME_US
from firehose.devnet.relay import DevnetConfig, DevnetRelay

DEFAULT_EVENTS = 10_000


def _start_time_us(text: str) -> int:
    """RFC 3339 (``2025-01-01T00:00:00Z``) -> microseconds since the epoch."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devnet")
    group.add_argument("--seed", type=int, default=0, help="seed of all generated data")
    group.add_argument("--accounts", type=int, default=200, help="number of accounts")
    group.add_argument(
        "--events", type=int, default=DEFAULT_EVENTS, help="events to produce in total"
    )
    group.add_argument(
        "--rate", type=float, default=0.0, help="events per second; 0 = all at once (default)"
    )
    group.add_argument("--host", default="127.0.0.1", help="listen address")
    group.add_argument("--port", type=int, default=0, help="listen port; 0 = any free port")
    group.add_argument(
        "--window", type=int, default=0, help="events kept for cursor replay; 0 = all"
    )
    group.add_argument("--truth", metavar="FILE", help="write the expected final state here")
    group.add_argument(
        "--drop-every", type=int, default=0, help="abort each connection every N frames"
    )
    group.add_argument(
        "--malformed-every", type=int, default=0, help="inject a malformed frame every N frames"
    )
    group.add_argument(
        "--start-time",
        type=_start_time_us,
        default=DEFAULT_START_TIME_US,
        help="virtual clock start, RFC 3339 (default 2025-01-01T00:00:00Z)",
    )


def config_from_args(args: argparse.Namespace) -> DevnetConfig:
    return DevnetConfig(
        seed=args.seed,
        accounts=args.accounts,
        events=args.events,
        rate=args.rate,
        host=args.host,
        port=args.port,
        window=args.window,
        drop_every=args.drop_every,
        malformed_every=args.malformed_every,
        start_time_us=args.start_time,
        truth_path=args.truth,
    )


async def run(args: argparse.Namespace) -> None:
    """Serve until cancelled; the truth file appears once every event has been produced."""
    relay = DevnetRelay(config_from_args(args))
    await relay.start()
    print(f"devnet relay listening on {relay.url}", flush=True)
    try:
        await relay.wait_generated()
        where = f", truth in {args.truth}" if args.truth else ""
        print(f"devnet generated {relay.head_seq} events{where}", flush=True)
        await asyncio.Event().wait()
    finally:
        await relay.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m firehose.devnet",
        description="Local AT Protocol relay producing signed, deterministic traffic.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        asyncio.run(run(args))
