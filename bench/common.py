"""Helpers shared by the benchmarks: CPU time of PostgreSQL's processes and of any set of
processes that changes while it is measured (backends come and go with a pool)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --- load on the machine --------------------------------------------------------------------

# A benchmark's figure is claimed only if the machine was otherwise idle: at most this much
# load (run queue, in cores) before the run, and at most this much CPU of other processes
# (cores, on average) while it ran. Issue 11: figures taken beside other test suites on two
# cores were a third of the quiet machine's.
MAX_CLAIM_LOAD = 1.0
# Taken when a benchmark starts (this module is imported first): its own preparation (a
# devnet building repos, a relay generating frames) must not count against it.
LOADAVG_AT_START = os.getloadavg()[0]


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (every core, all processes)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class MachineLoad:
    """The load around one measurement: the 1-minute load average when the benchmark started
    (before its own preparation), and the CPU the machine's OTHER processes used while the
    measurement ran (busy CPU of the whole machine minus the CPU of the processes the
    benchmark measures, per second of wall time). The bench's own load is not held against
    it: the load average while it runs counts its own cores."""

    def __init__(self) -> None:
        self.loadavg_before = LOADAVG_AT_START
        self._busy0 = _busy_cpu_s()
        self._t0 = time.monotonic()
        self.foreign_cores: float | None = None
        self.loadavg_after: float | None = None

    def stop(self, own_cpu_s: float) -> None:
        wall = max(time.monotonic() - self._t0, 1e-9)
        self.foreign_cores = max(0.0, (_busy_cpu_s() - self._busy0 - own_cpu_s) / wall)
        self.loadavg_after = os.getloadavg()[0]

    @property
    def load(self) -> float:
        """The figure compared with MAX_CLAIM_LOAD."""
        return max(self.loadavg_before, self.foreign_cores or 0.0)

    @property
    def quiet(self) -> bool:
        return self.load <= MAX_CLAIM_LOAD

    def fields(self) -> dict[str, Any]:
        return {
            "loadavg_1m_before": round(self.loadavg_before, 2),
            "loadavg_1m_after": round(self.loadavg_after or 0.0, 2),
            "foreign_cpu_cores": round(self.foreign_cores or 0.0, 2),
            "cores": os.cpu_count(),
            "claimed": self.quiet,
        }

    def describe(self) -> str:
        return (
            f"load: 1-minute average {self.loadavg_before:.2f} before the bench, other processes "
            f"used {self.foreign_cores or 0.0:.2f} cores while it ran ({os.cpu_count()} cores)"
        )


def claim(load: MachineLoad, line: str) -> str:
    """`line` (a throughput figure) if the machine was quiet, else a warning in its place.
    CPU time per event/record stays meaningful under load and is printed either way."""
    if load.quiet:
        return line
    return (
        f"WARNING: not claimed, load {load.load:.2f} > {MAX_CLAIM_LOAD:g} "
        f"(measured on a busy machine: {line})"
    )
