"""Helper processes: one backfill spread over BACKFILL_PROCESSES processes.

Why: a backfill process is one Python thread that downloads, hash-checks, walks and maps
every record and feeds every PostgreSQL transaction. Measured on 2 cores (bench/backfill.py,
1,000 repos x 500 records, `unthrottled`, four alternating pairs: docs/performance-log.md,
issue 11 session 9), one process kept 1.39-1.46 of the cores busy (with PostgreSQL and the
devnet), its thread and the database waiting for each other in turns, at 12,716-14,225
records/s; two processes on the same job kept 1.80-1.82 busy, at 15,752-18,214. On more
cores the one thread is the bound, and more processes lift it.

What: the process that runs the backfill (worker 0, or `firehose backfill run`) with
BACKFILL_PROCESSES=N > 1 starts N-1 helpers, `python -m firehose backfill helper`. Each
is a `BackfillService` of its own on the same job (its own pool and HTTP clients) and
claims repos from the shared queue like any two processes on one job (FOR UPDATE SKIP
LOCKED under a lease: each repo is written by one process once). BACKFILL_MAX_CONCURRENT
and BACKFILL_MAX_MEMORY_MB are split between the N processes
(`BackfillSettings.process_share`), so the totals stay what the user set.

The link, per helper: its stdin, and one more pipe back.

* Parent -> helper (stdin): one line, the helper's `HelperStart` (pickled, base64: a
  parent and the child it started trust each other), then one byte every
  PRESSURE_EVERY_S: ``1`` while the live stream is behind (BACKFILL_USE_IDLE holds the
  helper back as it holds the parent), ``0`` when not. End of file means the parent is
  gone, stopped or killed with -9: the helper stops too, handing its repos back, so no
  orphan goes on writing.
* Helper -> parent (the pipe): a JSON line of record counts every COUNTS_EVERY_S and at the
  end, so the parent's progress line and `backfill_records_total` count the whole backfill.
  Each helper saves its own counts to the job row, as any process does.

A helper logs where its parent logs (stdout and stderr are inherited), without the start and
progress lines. It never completes the job: it stops when the job is no longer active (the
parent completed it, or it was superseded). One that exits with an error is started again
after HELPER_RESTART_S (longer while it keeps failing).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import pickle
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

from backfill.progress import Counts
from backfill.settings import BackfillSettings
from backfill.throttle import LivePressure, live_behind

log = logging.getLogger("backfill")

PRESSURE_EVERY_S = 1.0
COUNTS_EVERY_S = 1.0
HELPER_RESTART_S = 5.0  # a failed helper's first restart; doubles while it keeps failing
HELPER_RESTART_MAX_S = 120.0
HELPER_HEALTHY_S = 60.0  # a helper that ran this long failed anew: the delay starts over
HELPER_STOP_S = 30.0  # a helper hands its repos back on stop; after this it is killed
COUNTS_FD_ENV = "FIREHOSE_BACKFILL_HELPER_FD"  # the pipe a helper writes its counts to
_BEHIND, _NOT_BEHIND = b"1", b"0"


@dataclass(frozen=True, slots=True)
class HelperStart:
    """What a helper runs with: its share of the settings and its parent's connections."""

    job_id: int
    backfill: BackfillSettings
    dsn: str  # holds the password: never logged
    pool_size: int
    relay_url: str
    worker_id: int
    wanted_collections: tuple[str, ...]
    live: bool  # the parent runs the live stream: follow its pressure


def encode_start(start: HelperStart) -> bytes:
    return base64.b64encode(pickle.dumps(start)) + b"\n"


def decode_start(line: bytes) -> HelperStart:
    start = pickle.loads(base64.b64decode(line.strip(), validate=True))
    if not isinstance(start, HelperStart):
        raise ValueError("not a HelperStart")
    return start


def encode_counts(c: Counts) -> bytes:
    fields = {"received": c.received, "processed": c.processed, "skipped": c.skipped}
    return json.dumps({**fields, "bytes": c.bytes}).encode() + b"\n"


def decode_counts(line: bytes) -> Counts:
    d = json.loads(line)
    values = [d[k] for k in ("received", "processed", "skipped", "bytes")]
    if not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"bad counts line {line[:100]!r}")
    return Counts(*values)


# --- the parent's side ------------------------------------------------------------------


def plan_helpers(
    settings: BackfillSettings,
    *,
    dsn: str | None,
    job_id: int,
    pool_size: int,
    relay_url: str,
    worker_id: int,
    wanted_collections: tuple[str, ...],
    live_pressure: Callable[[], LivePressure] | None,
    on_counts: Callable[[Counts], None],
) -> Helpers | None:
    """The helpers of a backfill of job `job_id` with `settings`, not started yet; None when
    it runs alone (BACKFILL_PROCESSES=1, or no database URL to give them)."""
    n = settings.processes
    if n <= 1:
        return None
    if dsn is None:
        log.warning("[BACKFILL] BACKFILL_PROCESSES=%d: no database URL to give helpers; "
                    "running in this process only", n)  # fmt: skip
        return None
    own = settings.process_share(0)
    log.info(
        "[BACKFILL] Running in %d processes (this one and %d helpers), each with up to "
        "%d repos in flight and %dMB of memory",
        n, n - 1, own.max_concurrent, own.max_memory_mb,
    )  # fmt: skip
    start = functools.partial(
        HelperStart,
        job_id=job_id,
        dsn=dsn,
        pool_size=pool_size,
        relay_url=relay_url,
        worker_id=worker_id,
        wanted_collections=wanted_collections,
        live=live_pressure is not None,
    )
    return Helpers(
        lambda i: start(backfill=settings.process_share(i)),
        n,
        behind=(lambda: False) if live_pressure is None else (lambda: live_behind(live_pressure())),
        on_counts=on_counts,
    )


class Helpers:
    """Start `start(i)` helpers i = 1..count-1, keep them running until `halt`, pass them
    the live stream's pressure and hand their counts to `on_counts`."""

    def __init__(
        self,
        start: Callable[[int], HelperStart],
        count: int,
        *,
        behind: Callable[[], bool],
        on_counts: Callable[[Counts], None],
    ) -> None:
        self._start = start
        self._count = count
        self._behind = behind
        self._on_counts = on_counts
        self.pids: dict[int, int] = {}  # helper index -> pid of its current process

    def rss_bytes(self) -> int:
        """The resident memory of the helpers running now (best effort: one may be gone)."""
        import psutil

        total = 0
        for pid in list(self.pids.values()):
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total

    async def run(self, halt: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for index in range(1, self._count):
                tg.create_task(self._keep(index, halt))

    async def _keep(self, index: int, halt: asyncio.Event) -> None:
        """Run helper `index` until `halt`; start it again when it fails (exits non-zero, or
        cannot be started), after HELPER_RESTART_S doubling up to HELPER_RESTART_MAX_S while
        it keeps failing within HELPER_HEALTHY_S. A failed helper never stops the backfill:
        this process goes on with its own share."""
        delay_s = HELPER_RESTART_S
        while not halt.is_set():
            started = time.monotonic()
            try:
                code: int | str = await self._run_one(index, halt)
            except Exception as exc:  # e.g. OSError: cannot start a process here
                code = f"{type(exc).__name__}: {exc}"[:200]
            if code == 0 or halt.is_set():
                return
            if time.monotonic() - started >= HELPER_HEALTHY_S:
                delay_s = HELPER_RESTART_S
            log.warning(
                "[BACKFILL] helper %d exited with status %s; starting it again in %.0f s",
                index, code, delay_s,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), delay_s)
            delay_s = min(delay_s * 2, HELPER_RESTART_MAX_S)

    async def _run_one(self, index: int, halt: asyncio.Event) -> int:
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "firehose", "backfill", "helper",
                stdin=asyncio.subprocess.PIPE, pass_fds=(write_fd,),
                env={**os.environ, COUNTS_FD_ENV: str(write_fd)},
            )  # fmt: skip
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the helper holds it now: EOF here when it exits
        self.pids[index] = proc.pid
        assert proc.stdin is not None
        counts = asyncio.create_task(self._read_counts(read_fd))
        try:
            proc.stdin.write(encode_start(self._start(index)))
            exited = asyncio.create_task(proc.wait())
            feed = asyncio.create_task(self._feed(proc.stdin, halt))
            await asyncio.wait({exited, feed}, return_when=asyncio.FIRST_COMPLETED)
            feed.cancel()
            if not exited.done():  # halted: the helper hands its repos back and exits
                try:
                    await asyncio.wait_for(exited, HELPER_STOP_S)
                except TimeoutError:
                    log.warning("[BACKFILL] helper %d did not stop in %.0f s: killed",
                                index, HELPER_STOP_S)  # fmt: skip
            await _kill(proc)
            await counts  # to the helper's last line: its pipe ends when it exits
        except BaseException:
            await _kill(proc)
            counts.cancel()
            raise
        finally:
            self.pids.pop(index, None)
        return proc.returncode if proc.returncode is not None else -1

    async def _feed(self, stdin: asyncio.StreamWriter, halt: asyncio.Event) -> None:
        """The pressure, once a second, until `halt`; then end of file: the helper stops."""
        with contextlib.suppress(ConnectionError):
            while not halt.is_set():
                stdin.write(_BEHIND if self._behind() else _NOT_BEHIND)
                await stdin.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), PRESSURE_EVERY_S)
        stdin.close()

    async def _read_counts(self, fd: int) -> None:
        async with _pipe_reader(os.fdopen(fd, "rb", buffering=0)) as reader:
            while line := await reader.readline():
                try:
                    self._on_counts(decode_counts(line))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("[BACKFILL] a helper sent a bad counts line: %s", exc)


@contextlib.asynccontextmanager
async def _pipe_reader(pipe: BinaryIO) -> AsyncIterator[asyncio.StreamReader]:
    """`pipe` read through the event loop (either end of the link), closed on the way out."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    try:
        yield reader
    finally:
        transport.close()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
    if proc.stdin is not None:
        proc.stdin.close()


# --- the helper's side ------------------------------------------------------------------


class ParentLink:
    """A helper's link to its parent: the pressure it reads, the counts it sends."""

    def __init__(self, stdin: BinaryIO, counts_fd: int) -> None:
        self._stdin = stdin
        self._counts_fd = counts_fd
        self.behind = False

    def read_start(self) -> HelperStart:
        return decode_start(self._stdin.readline())

    def pressure(self) -> LivePressure:
        """The live stream's pressure as the parent last said: behind, or not."""
        return LivePressure(math.inf if self.behind else 0.0, 0, 0)

    async def follow(self, stop: asyncio.Event) -> None:
        """Read the pressure until end of file (the parent is gone), then set `stop`."""
        try:
            async with _pipe_reader(self._stdin) as reader:
                while data := await reader.read(4096):
                    self.behind = data[-1:] == _BEHIND
        finally:
            stop.set()

    def send(self, counts: Counts) -> None:
        """Counts since the last send (a short blocking write: the parent reads all along)."""
        if not counts.empty:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._counts_fd, encode_counts(counts))

    async def report(self, total: Counts, stop: asyncio.Event) -> None:
        """Send what `total` (the helper's running totals) gained, every COUNTS_EVERY_S
        until `stop`, and a last time."""
        sent = Counts()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), COUNTS_EVERY_S)
            delta = total.minus(sent)
            self.send(delta)
            sent.add(delta)
            if stop.is_set():
                return


def helper_env_fd() -> int:
    raw = os.environ.get(COUNTS_FD_ENV, "")
    if not raw.isdigit():
        raise SystemExit(
            "firehose backfill helper is started by a backfill with BACKFILL_PROCESSES > 1, "
            "not by hand"
        )
    return int(raw)
