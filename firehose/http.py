"""The worker's HTTP side on METRICS_PORT.

* `GET /metrics` (Prometheus) and `GET /healthz` (the event loop answers).
* `GET /readyz`: 200 when the database answers, migrations are applied and the relay is
  connected or reconnecting within bounds; else 503 with the failing checks.
* `GET /status`: the worker's position, lag, queue and backfill progress as JSON.
* `POST /backfill/pause|resume`: only when ADMIN_TOKEN is set (else 404), with
  `Authorization: Bearer <ADMIN_TOKEN>` (else 401).

The worker-specific answers come from an `Operations` object (firehose.ops.WorkerOps), so
this module knows nothing of the worker's internals.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("firehose.http")

_dumps = functools.partial(json.dumps, default=str)


class Operations(Protocol):
    async def status(self) -> dict[str, Any]: ...

    async def readiness(self) -> dict[str, str | None]:
        """Check name -> None when it passes, else the reason it fails."""
        ...

    async def backfill_control(self, verb: str) -> tuple[bool, dict[str, Any]]: ...


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time: the comparison must not leak how much of a guess was right.
    return hmac.compare_digest(given.strip().encode(), token.encode())


def build_app(
    registry: CollectorRegistry,
    ops: Operations | None = None,
    admin_token: str | None = None,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    if ops is None:
        return app

    async def readyz(_: web.Request) -> web.Response:
        checks = await ops.readiness()
        failed = {name: why for name, why in checks.items() if why is not None}
        body = {"ready": not failed, "checks": {k: v or "ok" for k, v in checks.items()}}
        if failed:
            body["failed"] = sorted(failed)
        return web.json_response(body, status=503 if failed else 200)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await ops.status(), dumps=_dumps)

    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    if admin_token:  # unset: the admin endpoints do not exist (404)
        token = admin_token

        def control(verb: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                if not _authorized(request, token):
                    log.warning("refused POST %s: missing or wrong admin token", request.path)
                    return web.json_response(
                        {"ok": False, "error": "unauthorized"},
                        status=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                moved, body = await ops.backfill_control(verb)
                log.info("POST %s: %s", request.path, body)
                return web.json_response(body, status=200 if moved else 409, dumps=_dumps)

            return handler

        app.router.add_post("/backfill/pause", control("pause"))
        app.router.add_post("/backfill/resume", control("resume"))
    return app


async def start_http(
    registry: CollectorRegistry,
    port: int,
    host: str = "0.0.0.0",
    *,
    ops: Operations | None = None,
    admin_token: str | None = None,
) -> web.AppRunner | None:
    """Serve the app; port 0 disables it. Returns the runner to clean up."""
    if port == 0:
        return None
    runner = web.AppRunner(build_app(registry, ops, admin_token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
