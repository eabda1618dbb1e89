"""Test helper: a real aiohttp.web server on 127.0.0.1 (no socket mocking)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from backfill.hosts import HostClient


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on an ephemeral port; yield its base URL ``http://127.0.0.1:PORT``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def host_client(**kwargs: object) -> AsyncIterator[HostClient]:
    kwargs.setdefault("allow_private", True)
    async with aiohttp.ClientSession() as session:
        yield HostClient(session, **kwargs)  # type: ignore[arg-type]
