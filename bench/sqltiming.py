"""Wall time of every SQL call (asyncpg), keyed by the statement's first words.

Shared by the benchmarks' `--statements` option: it says which statements the time goes
to, without pg_stat_statements (the embedded server does not load it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_records_to_table")


def statement_words(query: str, words: int = 5) -> str:
    """A statement's first words, whitespace folded: the key it is reported under (here and
    in bench/pgwaits.py)."""
    return " ".join(query.split()[:words])[:70]


class StatementTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        """Wrap asyncpg's Connection methods in this process (benchmarks only)."""
        import asyncpg.connection

        cls = asyncpg.connection.Connection
        for name in METHODS:
            setattr(cls, name, self._wrap(name, getattr(cls, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        times = self

        async def timed(conn: Any, *args: Any, **kwargs: Any) -> Any:
            first = str(args[0]) if args else ""
            if name != "copy_records_to_table":  # its first argument is the table name
                first = statement_words(first)
            key = f"{name}: {first}"
            t0 = time.perf_counter()
            try:
                return await fn(conn, *args, **kwargs)
            finally:
                times.seconds[key] += time.perf_counter() - t0
                times.calls[key] += 1

        return timed

    def top(self, n: int = 12) -> list[tuple[str, float, int]]:
        """(statement, seconds, calls), the most expensive first."""
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:n]
        return [(key, s, self.calls[key]) for key, s in ranked]
