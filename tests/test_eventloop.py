"""Every `firehose` command, backfill helpers included, runs on uvloop (firehose.eventloop)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import uvloop

from firehose import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_run_returns_the_result_on_uvloop() -> None:
    assert eventloop.run(_loop_type()) is uvloop.Loop


def test_backfill_commands_run_on_uvloop() -> None:
    # `firehose backfill ...` (run, helper, status) went through asyncio.run once, so the
    # helper processes doing half a backfill's work ran on the selector loop.
    code = (
        "import asyncio, sys\n"
        "import backfill.cli as cli\n"
        "from firehose import eventloop\n"
        "async def probe(args, settings):\n"
        "    print(type(asyncio.get_running_loop()).__module__)\n"
        "    return 0\n"
        "cli._status = probe\n"
        "sys.exit(cli.handle(type('A', (), {'backfill_command': 'status'})(), None))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "uvloop"
