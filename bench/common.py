"""Helpers shared by the benchmarks: CPU time of PostgreSQL's processes and of any set of
processes that changes while it is measured (backends come and go with a pool)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

import psutil


def postgres_processes(pg_dir: Path) -> list[psutil.Process]:
    """The postmaster of an embedded server and its children (backends, WAL writer...)."""
    pid = int((pg_dir / "postmaster.pid").read_text().split()[0])
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` so far (a process that exited counts 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


class CpuTracker:
    """CPU seconds of a changing set of processes: each pid's latest reading, sampled in a
    thread, summed over every pid seen since the tracker started."""

    def __init__(self, procs: Callable[[], list[psutil.Process]]) -> None:
        self._procs = procs
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._sample()  # the baseline of the processes already there
        self._first = dict(self._last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            for p in self._procs():
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self._last[p.pid] = t.user + t.system

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(v - self._first.get(pid, 0.0) for pid, v in self._last.items())
