"""The event loop every `firehose` command runs on: uvloop where it is installed.

uvloop is a dependency on Linux and macOS; asyncio's own loop is the fallback elsewhere. Every
entry point goes through `run`, helper processes included: `firehose backfill helper` on
asyncio's selector loop spent about a fifth of its samples in the transport's socket writes
(py-spy, bench/backfill.py), which uvloop does in C.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a new event loop and return its result."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)
