"""The offline quick start (`BACKFILL_DAYS=30 firehose run --devnet` in an empty folder) and
the private-address exception it relies on.

* `HostClient(allowed_private_hosts=...)` lets exactly the listed ``host:port`` keys through
  while every other loopback port stays refused (before the request and at connect time);
* a real-network configuration (no `--devnet`) keeps refusing the devnet's loopback relay,
  while the `--devnet` settings reach its relay, PLC directory and PDS hosts;
* the command itself, as a user runs it: a fresh folder, the embedded database, at most 90 s,
  then `firehose backfill status --json` shows a job that wrote records and the log has no
  repo or listing failed "for good".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from backfill_http import host_client, serve

from backfill.hosts import FetchError, host_key
from backfill.network import open_http_network
from firehose.cli import devnet_worker_settings
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.settings import Settings

QUICKSTART_BUDGET_S = 90.0  # the limit for the whole command
STOP_TIMEOUT_S = 30.0  # SIGTERM -> exit (10 s by design; generous for a loaded machine)
STATUS_TIMEOUT_S = 120.0  # `firehose backfill status` starts (joins) the embedded server
URI_LINE = re.compile(r"embedded PostgreSQL ready: psql '(\S+)'")


def _app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/x", handler)
    return app


async def test_allow_list_admits_listed_ports_only() -> None:
    async with serve(_app()) as allowed, serve(_app()) as other:
        allowed_port = allowed.rsplit(":", 1)[1]
        other_port = other.rsplit(":", 1)[1]
        listed = [host_key(allowed), f"LOCALHOST:{allowed_port}"]  # keys are case-blind
        async with host_client(allow_private=False, allowed_private_hosts=listed) as http:
            assert await http.get_json(allowed + "/x") == {"ok": True}
            # A name, not an IP literal: the connect-time guard (GuardedResolver) judges it.
            assert await http.get_json(f"http://localhost:{allowed_port}/x") == {"ok": True}
            for url in (other + "/x", f"http://localhost:{other_port}/x"):
                with pytest.raises(FetchError) as info:
                    await http.get_json(url)
                assert info.value.reason == "forbidden_address", url
                assert not info.value.transient


async def test_real_network_settings_refuse_the_devnet_and_devnet_settings_reach_it() -> None:
    settings = Settings.from_env({"BACKFILL_DAYS": "30"})
    assert settings.backfill.allowed_private_hosts == ()  # no variable can set it
    assert not settings.backfill.allow_private_network
    config = DevnetConfig(seed=3, accounts=20, events=200, repo_accounts=3, repo_records=10)
    async with DevnetRelay(config) as relay:
        async with open_http_network(settings.backfill, relay.url) as net:
            with pytest.raises(FetchError) as info:
                await net.list_repos(None, 100)
            assert info.value.reason == "forbidden_address"

        devnet = devnet_worker_settings(settings, relay)
        assert devnet.backfill.plc_url == relay.network.plc_url
        assert devnet.relay.url == relay.url
        assert not devnet.backfill.allow_private_network  # only its own ports, listed
        async with open_http_network(devnet.backfill, devnet.relay.url) as net:
            page = await net.list_repos(None, 1000)
            dids = [entry.did for entry in page.repos]
            assert len(dids) >= 3
            snap = await net.fetch(dids[0])  # PLC document, then getRepo from its PDS
            try:
                assert snap.did == dids[0]
                assert snap.rev and snap.data_cid
            finally:
                snap.close()


def _user_env() -> dict[str, str]:
    """A newcomer's shell: none of the worker's variables set (the tests' own included)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _firehose() -> list[str]:
    script = Path(sys.executable).with_name("firehose")
    return [str(script)] if script.exists() else [sys.executable, "-m", "firehose"]


async def _count_rows(uri: str) -> int:
    conn = await asyncpg.connect(uri, timeout=30)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM posts"))
    finally:
        await conn.close()


def test_quickstart_devnet_backfill(tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    env = {**_user_env(), "BACKFILL_DAYS": "30", "METRICS_PORT": "0"}
    log_path = folder / "worker.log"
    started = time.monotonic()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [*_firehose(), "run", "--devnet"],
            cwd=folder,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        # Wait for the job to complete, within the command's 90 s; a loaded machine may
        # leave it running, which the status check below accepts.
        uri = None
        while time.monotonic() - started < QUICKSTART_BUDGET_S:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            text = log_path.read_text()
            uri = uri or (m.group(1) if (m := URI_LINE.search(text)) else None)
            if "[BACKFILL] Completed job" in text:
                break
            time.sleep(1.0)
        # The log's URI reaches the embedded database (the README's psql query).
        assert uri is not None, log_path.read_text()[-3000:]
        assert asyncio.run(_count_rows(uri)) > 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the worker did not stop within 30 s of SIGTERM") from None
    log = log_path.read_text()
    assert code == 0, log[-3000:]  # SIGTERM is a clean stop
    assert "worker stopped at cursor" in log
    assert "for good" not in log, log
    assert "[BACKFILL] Starting 30-day historical backfill on primary worker..." in log
    assert "[BACKFILL] Progress: " in log  # logged at completion or stop at the latest
    assert "[BACKFILL] Memory: " in log

    out = subprocess.run(
        [*_firehose(), "backfill", "status", "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=STATUS_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["status"] in ("completed", "running"), status
    assert status["days"] == 30
    assert status["records"]["processed"] > 0, status
    assert status["repos"]["failed"] == 0, status
    if status["status"] == "completed":
        assert status["repos"]["done"] == status["repos"]["total"] > 0
