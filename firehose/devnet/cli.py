"""Command-line entry points: `firehose devnet ...` (via firehose/cli.py) and
`python -m firehose.devnet ...`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from firehose import eventloop
from firehose.devnet.httpfaults import HttpFaults
from firehose.devnet.options import (
    DEFAULT_START_TIME_US,
    MISSING_RECORD_MODES,
    MISSING_RECORD_PROOF,
    MODELS,
)

# The relay (and with it aiohttp's server, the keys, the generators) is imported where a
# devnet starts, not here: `firehose`'s parser imports this module for every command
# (firehose.devnet.options).
if TYPE_CHECKING:
    from firehose.devnet.relay import DevnetConfig

DEFAULT_EVENTS = 10_000
DEFAULT_MODEL_ACCOUNTS = 2000


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
        "--cut-every",
        type=int,
        default=0,
        help="send half of every Nth frame, then close the TCP socket (no close frame)",
    )
    group.add_argument(
        "--garbage-every",
        type=int,
        default=0,
        help="send a garbage message (noise, empty, text, non-frame CBOR) every N frames",
    )
    group.add_argument(
        "--silence-every",
        type=int,
        default=0,
        help="go silent for --silence-s seconds (socket open) every N frames",
    )
    group.add_argument(
        "--silence-s", type=float, default=5.0, help="length of each --silence-every pause"
    )
    group.add_argument(
        "--forge-every",
        type=int,
        default=0,
        help="make every Nth event a commit signed with the wrong key (not in the truth)",
    )
    group.add_argument(
        "--reset-seq-after",
        type=int,
        default=0,
        help="restart the relay after N events: connections dropped, seq starts again at 1",
    )
    group.add_argument(
        "--start-time",
        type=_start_time_us,
        default=DEFAULT_START_TIME_US,
        help="virtual clock start, RFC 3339 (default 2025-01-01T00:00:00Z); ignored with "
        "--history-days",
    )
    history = parser.add_argument_group("devnet history (backfill)")
    history.add_argument(
        "--now",
        type=_start_time_us,
        default=None,
        help="the devnet's 'now', RFC 3339 (default: the real time at start)",
    )
    history.add_argument(
        "--history-days",
        type=float,
        default=0.0,
        help="spread the first --history-events events over this many days before --now",
    )
    history.add_argument(
        "--history-events",
        type=int,
        default=None,
        help="events in the history phase (default with --history-days: all of --events); "
        "the rest continue live from --now",
    )
    history.add_argument(
        "--repo-accounts",
        type=int,
        default=0,
        help="pre-populated accounts built directly (no firehose events; getRepo only)",
    )
    history.add_argument(
        "--repo-records", type=int, default=500, help="records per pre-populated account"
    )
    history.add_argument(
        "--extra-car",
        action="append",
        default=[],
        metavar="PATH",
        help="serve this repository CAR verbatim from a PDS (repeatable)",
    )
    history.add_argument(
        "--did-web-records",
        type=int,
        default=0,
        help="add a did:web account with this many records on PDS 0 (0 = none)",
    )
    history.add_argument(
        "--history-model",
        choices=MODELS,
        default="",
        help="add accounts whose repos grew commit by commit over the year before --now "
        "(most dormant, some daily, a few heavy, some with a custom lexicon)",
    )
    history.add_argument(
        "--model-accounts",
        type=int,
        default=DEFAULT_MODEL_ACCOUNTS,
        help=f"accounts of --history-model (default {DEFAULT_MODEL_ACCOUNTS})",
    )
    http = parser.add_argument_group("devnet HTTP: PDS hosts, PLC directory, faults")
    http.add_argument("--pds-hosts", type=int, default=3, help="PDS hosts (one port each)")
    http.add_argument("--plc-port", type=int, default=0, help="PLC directory port; 0 = free")
    http.add_argument(
        "--pds-port-base", type=int, default=0, help="PDS i listens on BASE+i; 0 = free ports"
    )
    http.add_argument(
        "--rate-limit",
        action="append",
        metavar="[HOST:]N/SECONDS",
        help="per-host fixed-window limit with RateLimit-* headers, 429 past it",
    )
    http.add_argument(
        "--429-without-headers",
        dest="without_headers",
        action="store_true",
        help="429 answers carry no RateLimit-*/Retry-After headers",
    )
    http.add_argument(
        "--storm-429",
        action="append",
        metavar="[HOST:]P",
        help="answer 429 with probability P (0.2) or every Nth request (4)",
    )
    http.add_argument(
        "--fail-5xx", action="append", metavar="[HOST:]P", help="answer 5xx (P as above)"
    )
    http.add_argument(
        "--slow-host", action="append", metavar="[HOST:]MS", help="add MS ms before answers"
    )
    http.add_argument(
        "--truncate-car",
        action="append",
        metavar="[HOST:]P",
        help="cut getRepo CARs mid-section (P as above)",
    )
    http.add_argument(
        "--ignore-since",
        action="store_true",
        help="PDS hosts answer getRepo with the whole repo whatever since says",
    )
    http.add_argument(
        "--missing-record",
        choices=MISSING_RECORD_MODES,
        default=MISSING_RECORD_PROOF,
        help="getRecord of a missing record: a CAR proving absence (the reference PDS, "
        "default) or 400 RecordNotFound",
    )
    http.add_argument(
        "--no-list-repos-by-collection",
        type=int,
        nargs="?",
        const=404,
        default=0,
        choices=(404, 501),
        metavar="STATUS",
        help="the relay lacks listReposByCollection: 404 (indigo relay, default) or 501 "
        "MethodNotImplemented (TypeScript xrpc-server)",
    )


def config_from_args(args: argparse.Namespace) -> DevnetConfig:
    from firehose.devnet.relay import DevnetConfig

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
        cut_every=args.cut_every,
        garbage_every=args.garbage_every,
        silence_every=args.silence_every,
        silence_s=args.silence_s,
        reset_seq_after=args.reset_seq_after,
        start_time_us=args.start_time,
        truth_path=args.truth,
        now_us=args.now,
        history_days=args.history_days,
        history_events=(
            args.events
            if args.history_events is None and args.history_days > 0
            else args.history_events or 0
        ),
        pds_hosts=args.pds_hosts,
        plc_port=args.plc_port,
        pds_port_base=args.pds_port_base,
        repo_accounts=args.repo_accounts,
        repo_records=args.repo_records,
        extra_cars=tuple(args.extra_car),
        did_web_records=args.did_web_records,
        history_model=args.history_model,
        model_accounts=args.model_accounts if args.history_model else 0,
        ignore_since=args.ignore_since,
        missing_record=args.missing_record,
        no_list_repos_by_collection=args.no_list_repos_by_collection,
        http_faults=HttpFaults.parse(
            rate_limit=args.rate_limit,
            without_headers=args.without_headers,
            storm_429=args.storm_429,
            fail_5xx=args.fail_5xx,
            slow_host=args.slow_host,
            truncate_car=args.truncate_car,
        ),
    )


async def run(args: argparse.Namespace) -> None:
    """Serve until cancelled; the truth file appears once every event has been produced."""
    from firehose.devnet.relay import DevnetRelay

    relay = DevnetRelay(config_from_args(args))
    relay.generator.forge_every = args.forge_every  # before start(): the producer runs then
    await relay.start()
    # The relay line comes first: existing consumers read only the first line.
    print(f"devnet relay listening on {relay.url}", flush=True)
    print(f"devnet PLC directory on {relay.network.plc_url}", flush=True)
    for index, url in enumerate(relay.network.pds_urls):
        print(f"devnet PDS {index} on {url}", flush=True)
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
        eventloop.run(run(args))
