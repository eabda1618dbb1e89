"""The monitoring stack for real: a real Prometheus (Debian package `prometheus`, installed
by .ci/run) scrapes a unified worker that follows the devnet's live traffic and backfills a
30-day window; every PromQL expression of the Grafana dashboards then returns data through
Prometheus' HTTP API. The guide's other checks ride along: `[BACKFILL]` log lines and the
`backfill` row of `firehose_cursor`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from backfill_support import BackfillProcess, HistoryDevnet
from support import free_port
from test_deploy import DASHBOARDS, dashboard_exprs

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")


def prom_get(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str]:
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: firehose\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(tmp / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "prometheus.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("prometheus did not get ready")


async def wait_for(what: str, check: Any, timeout_s: float, *procs: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.alive(), f"{what}: worker exited:\n{p.log()[-3000:]}"
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary (Debian package prometheus; .ci/run installs it)",
)
async def test_every_dashboard_expression_returns_data(tmp_path: Path, db_dsn: str) -> None:
    net = HistoryDevnet.start(
        tmp_path / "devnet",
        "--seed", "31", "--accounts", "20", "--events", "6000", "--rate", "100",
        "--history-days", "60", "--history-events", "300",
        "--repo-accounts", "10", "--repo-records", "50",
        wait_generated=False,
    )  # fmt: skip
    metrics_port = free_port()
    worker = BackfillProcess.start(
        tmp_path, db_dsn, net, worker=True,
        METRICS_PORT=str(metrics_port), BACKFILL_DAYS="30",
        BACKFILL_PROFILE="aggressive", BACKFILL_BATCH_DELAY_MS="200",
    )  # fmt: skip
    prom, base = None, ""
    try:
        prom, base = start_prometheus(tmp_path, metrics_port)

        async def scraped() -> bool:
            r = prom_get(base, "/api/v1/query", query='count_over_time(up{job="firehose"}[1m])')
            up = prom_get(base, "/api/v1/query", query='up{job="firehose"}')["data"]["result"]
            samples = r["data"]["result"]
            return bool(samples and up and float(samples[0]["value"][1]) >= 5) and (
                up[0]["value"][1] == "1"
            )

        await wait_for("five scrapes of the worker", scraped, 60, worker)

        exprs = sorted(
            {e for path in DASHBOARDS for e in dashboard_exprs(json.loads(path.read_text()))}
        )
        empty: list[str] = exprs

        async def all_have_data() -> bool:
            nonlocal empty
            empty = []
            for expr in exprs:
                r = prom_get(base, "/api/v1/query", query=expr)
                assert r["status"] == "success", (expr, r)
                if not r["data"]["result"]:
                    empty.append(expr)
            return not empty

        try:
            await wait_for("every dashboard expression has data", all_have_data, 45, worker)
        except TimeoutError:
            raise AssertionError(f"no data for: {empty}\n{worker.log()[-2000:]}") from None

        # The guide's checks: `docker-compose logs python-worker | grep BACKFILL` ...
        # Waited for, not read at once: the backfill's metrics exist (registered when its
        # service is built) a moment before it logs this line.
        async def start_line_logged() -> bool:
            return "[BACKFILL] Starting 30-day historical backfill" in worker.log()

        await wait_for("the backfill's start line", start_line_logged, 30, worker)

        # ... and `SELECT * FROM firehose_cursor WHERE service = 'backfill'`.
        async def backfill_cursor() -> bool:
            conn = await asyncpg.connect(db_dsn)
            try:
                row = await conn.fetchrow(
                    "SELECT * FROM firehose_cursor WHERE service = 'backfill'"
                )
                return row is not None and row["cursor"] >= 1
            finally:
                await conn.close()

        await wait_for("the backfill row of firehose_cursor", backfill_cursor, 30, worker)
        assert worker.terminate() == 0, worker.log()[-3000:]
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(10)
        worker.terminate()
        net.stop()
