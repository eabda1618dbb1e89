"""What PostgreSQL's backends do while a benchmark runs: the benchmarks' `--waits` option.

Every WAITS_SAMPLE_S a thread of the benchmark reads `pg_stat_activity` on a connection of its
own and counts the other client backends of its database by state, wait event and the
statement's first words. The report is the average number of backends in each, per sample,
which says where a pipeline's time goes on the server side:

* `active` with no wait event: running on a CPU (or waiting for one);
* `active` with a wait event: waiting for a lock (`Lock:extend`, `Lock:transactionid`), for
  WAL (`LWLock:WALWrite`, `IO:WALSync`) or for a data file;
* `idle in transaction`, `Client:ClientRead`: waiting for the benchmark's process to send the
  transaction's next statement (its event loop was busy elsewhere);
* `idle`: a pooled connection between transactions.

Issue 11, session 7: this is how the backfill's three DB slots were found to run the fresh
load less than half of the time (docs/performance.md). The sampling thread costs the
benchmark's process about 1 % of a core, counted in its CPU figures.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import asyncpg

from bench.sqltiming import statement_words

WAITS_SAMPLE_S = 0.02

# The other client backends of the database (the sampler's own is left out, and so are
# other databases' on a shared server).
ACTIVITY = """
SELECT state, wait_event_type, wait_event, left(query, 200) AS query
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
   AND datname = current_database()
"""

Key = tuple[str, str, str]


class PgWaits:
    """Samples `pg_stat_activity` of `dsn` in a thread from `start` to `stop`."""

    def __init__(self, dsn: str, sample_s: float = WAITS_SAMPLE_S) -> None:
        self._dsn = dsn
        self._sample_s = sample_s
        self.counts: Counter[Key] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_thread, daemon=True)
        self._error: BaseException | None = None

    def start(self) -> PgWaits:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._sample_until_stopped())
        except BaseException as exc:  # reported by stop(), in the caller's thread
            self._error = exc

    async def _sample_until_stopped(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                self.add(await conn.fetch(ACTIVITY))
                await asyncio.sleep(self._sample_s)
        finally:
            await conn.close()

    def add(self, rows: list[asyncpg.Record]) -> None:
        """Count one sample's backends."""
        for row in rows:
            state = row["state"] or "?"
            if state == "idle":
                self.counts[(state, "", "")] += 1
                continue
            kind, event = row["wait_event_type"], row["wait_event"]
            wait = f"{kind}:{event}" if kind else "-"
            self.counts[(state, wait, statement_words(row["query"] or ""))] += 1
        self.samples += 1

    def averages(self) -> list[tuple[Key, float]]:
        """(state, wait, statement) and the average number of backends in it, most first."""
        n = max(self.samples, 1)
        return [(key, count / n) for key, count in self.counts.most_common()]

    def report(self, top: int = 20) -> None:
        print(f"PostgreSQL backends, average of {self.samples} samples (state, wait, statement):")
        for (state, wait, statement), backends in self.averages()[:top]:
            print(f"  {backends:5.2f}  {state:20} {wait:24} {statement}")
