"""Command line: `firehose run | devnet | migrate | status | backfill ...`.

`python -m firehose` is `firehose run`.

Configuration comes from the environment (see README); a bad value exits with status 2 and
a message naming the variable (design invariant 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from firehose import __version__, eventloop, logs
from firehose.settings import ConfigError, Settings

if TYPE_CHECKING:
    from firehose.devnet.relay import DevnetConfig, DevnetRelay

log = logging.getLogger("firehose")

EXIT_CONFIG = 2
# `run --devnet` keeps producing for days at the default rate, retaining a bounded replay
# window so the devnet's memory stays flat.
DEVNET_QUICKSTART_EVENTS = 100_000_000
DEVNET_QUICKSTART_WINDOW_EVENTS = 100_000
# Its history: the devnet's year model (firehose/devnet/model.py), accounts that existed
# before the relay started (no firehose event names them) and wrote over the year before now,
# most of them quiet for more than a month. Sized so that `BACKFILL_DAYS=30` with the
# conservative profile (5 records per batch, 2 s between batches, 2 repos at once) finishes
# in well under a minute: fewer than 20 accounts, so none is the model's "heavy" writer
# (~180 records in 30 days, over a minute of batch delays on its own).
DEVNET_QUICKSTART_HISTORY_ACCOUNTS = 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firehose",
        description="AT Protocol firehose + backfill indexer into PostgreSQL. "
        "Settings come from environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the unified worker (default)")
    run.add_argument(
        "--devnet",
        action="store_true",
        help="start a local devnet relay on loopback and index it (offline quick start)",
    )
    run.add_argument("--devnet-seed", type=int, default=1, help="devnet seed (with --devnet)")
    run.add_argument(
        "--devnet-rate", type=float, default=50.0, help="devnet events/s (with --devnet)"
    )

    from firehose.devnet import cli as devnet_cli

    devnet = sub.add_parser("devnet", help="serve a local relay with seeded, signed traffic")
    devnet_cli.add_arguments(devnet)

    sub.add_parser("migrate", help="apply database migrations and exit")

    from firehose import status_cli

    status_cli.add_subcommand(sub)

    from backfill import cli as backfill_cli

    backfill_cli.add_subcommands(sub)
    resync = sub.add_parser("resync", help="queue repos for a resync from their PDS (getRepo)")
    resync.add_argument("dids", nargs="+", metavar="DID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    command = args.command or "run"
    if command == "devnet":
        logs.configure("INFO", "text")
        from firehose.devnet import cli as devnet_cli

        return _run_async(devnet_cli.run(args))
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"firehose: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level, settings.log_format)
    if command == "migrate":
        return _run_async(_migrate(settings))
    if command == "backfill":
        from backfill import cli as backfill_cli

        return backfill_cli.handle(args, settings)
    if command == "status":
        from firehose import status_cli

        return status_cli.handle(args, settings)
    if command == "resync":
        return _resync(settings, args.dids)
    return _run_async(
        _run(
            settings,
            devnet=getattr(args, "devnet", False),
            devnet_seed=getattr(args, "devnet_seed", 1),
            devnet_rate=getattr(args, "devnet_rate", 50.0),
        )
    )


def _run_async(coro: Coroutine[Any, Any, None]) -> int:
    try:
        eventloop.run(coro)
    except KeyboardInterrupt:
        return 130
    return 0


async def _run(settings: Settings, *, devnet: bool, devnet_seed: int, devnet_rate: float) -> None:
    from firehose.worker import Worker, run_until_signalled

    if not devnet:
        await run_until_signalled(Worker(settings))
        return
    from firehose.devnet.model import SPAN_DAYS
    from firehose.devnet.relay import DevnetRelay

    config = devnet_quickstart_config(devnet_seed, devnet_rate, int(time.time() * 1_000_000))
    async with DevnetRelay(config) as relay:
        log.info("devnet relay on %s (seed %d, %.0f events/s)", relay.url, devnet_seed, devnet_rate)
        log.info(
            "devnet history: %d accounts that wrote over the %d days before now (%s model), "
            "PLC directory %s, PDS hosts %s",
            config.model_accounts,
            SPAN_DAYS,
            config.history_model,
            relay.network.plc_url,
            " ".join(relay.network.pds_urls),
        )
        # The devnet's history starts at seq 1: with no saved cursor, index it from there.
        await run_until_signalled(Worker(devnet_worker_settings(settings, relay), default_cursor=0))


def devnet_quickstart_config(seed: int, rate: float, now_us: int) -> DevnetConfig:
    """The devnet of `run --devnet`: live traffic from now on, plus a history the backfill
    can fetch (the year model's accounts, served by the PDS hosts, listed by the relay's
    listRepos, resolved through its PLC directory)."""
    from firehose.devnet.options import MODEL_YEAR
    from firehose.devnet.relay import DevnetConfig

    # The devnet's virtual clock starts now, so lag and record times look like a live network.
    return DevnetConfig(
        seed=seed,
        rate=rate,
        events=DEVNET_QUICKSTART_EVENTS,
        window=DEVNET_QUICKSTART_WINDOW_EVENTS,
        start_time_us=now_us,
        now_us=now_us,
        history_model=MODEL_YEAR,
        model_accounts=DEVNET_QUICKSTART_HISTORY_ACCOUNTS,
    )


def devnet_worker_settings(settings: Settings, relay: DevnetRelay) -> Settings:
    """`settings` pointed at the devnet: its relay, its PLC directory, and loopback allowed
    for exactly its own ports (backfill/hosts.py): every other private address stays refused,
    as on the real network."""
    from backfill.http_rules import host_key
    from backfill.relay_http import relay_http_base

    network = relay.network
    http_relay = relay_http_base(relay.url)  # where the backfill asks listRepos
    own_hosts = tuple(host_key(url) for url in (http_relay, network.plc_url, *network.pds_urls))
    if settings.backfill.plc_url != network.plc_url:
        log.info("--devnet: PLC_URL is the devnet's PLC directory %s", network.plc_url)
    # Devnet handles (*.devnet.test) are verified at a devnet PDS host's well-known answer
    # (docs/identity.md): every host answers for every devnet handle.
    handles = dataclasses.replace(
        settings.backfill.handles,
        overrides=(*settings.backfill.handles.overrides, ("devnet.test", network.pds_urls[0])),
    )
    backfill = dataclasses.replace(
        settings.backfill,
        plc_url=network.plc_url,
        allowed_private_hosts=own_hosts,
        handles=handles,
    )
    relay_settings = dataclasses.replace(settings.relay, url=relay.url)
    return dataclasses.replace(settings, relay=relay_settings, backfill=backfill)


def _resync(settings: Settings, dids: list[str]) -> int:
    """`firehose resync DID...`: queue the repos; a running worker picks them up."""
    from firehose.protocol.syntax import is_did

    bad = [d for d in dids if not is_did(d)]
    if bad:
        print(f"firehose resync: not a DID: {', '.join(bad)}", file=sys.stderr)
        return EXIT_CONFIG

    async def go() -> None:
        from backfill import resync
        from firehose.storage.database import Database

        db = await Database.open(settings.database)
        try:
            async with db.pool.acquire() as conn:
                queued = await resync.request(conn, list(dids))
        finally:
            await db.close()
        print(f"{queued} of {len(set(dids))} repos queued for a resync (others already pending)")

    return _run_async(go())


async def _migrate(settings: Settings) -> None:
    from firehose.storage.database import Database

    db = await Database.open(settings.database)
    await db.close()
    log.info("database schema is up to date")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
