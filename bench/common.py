"""Helpers shared by the benchmarks: CPU time of PostgreSQL's processes and of any set of
processes that changes while it is measured (backends come and go with a pool)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
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


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for (a
    backfill's helper processes, backfill/helpers.py, once the job is done)."""
    t = os.times()
    return t.children_user + t.children_system


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


# How often a CpuTracker lists its processes again. A listing of PostgreSQL's walks /proc
# through psutil in Python, in the benchmark's own process: at 0.2 s, py-spy put 3.4% of the
# worker process's samples of bench/live.py there (its CPU counted as the worker's, its GIL
# taken from it). A pool's backends live for the whole run, so a second is fine-grained
# enough; `stop` takes a last reading.
CPU_SAMPLE_S = 1.0


class CpuTracker:
    """CPU seconds of a changing set of processes: each pid's latest reading, sampled in a
    thread every CPU_SAMPLE_S, summed over every pid seen since the tracker started."""

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
        while not self._stop.wait(CPU_SAMPLE_S):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(v - self._first.get(pid, 0.0) for pid, v in self._last.items())


# --- load on the machine --------------------------------------------------------------------

# A benchmark's figure is claimed only if the machine was otherwise quiet: a load of at most
# MAX_CLAIM_LOAD (busy cores, measured over LOAD_SAMPLE_S just before the bench starts), and
# at most MAX_FOREIGN_CORES of other processes' CPU while it ran (cores, on average). Issue
# 11: figures taken beside other test suites on two cores were a third of a quiet machine's.
# The 1-minute load average is printed too but not used: it still counts a benchmark that
# ended seconds ago (the previous run of a series), and its own cores while it runs.
MAX_CLAIM_LOAD = 1.0
MAX_FOREIGN_CORES = 0.25
LOAD_SAMPLE_S = 2.0


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (every core, all processes)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _busy_cores_now(sample_s: float = LOAD_SAMPLE_S) -> float:
    busy0, t0 = _busy_cpu_s(), time.monotonic()
    time.sleep(sample_s)
    return max(0.0, (_busy_cpu_s() - busy0) / (time.monotonic() - t0))


SPEED_RECORDS = 1_000  # per timed round of machine_speed_us: ~20-40 ms


def machine_speed_us() -> float:
    """This machine's speed just now: µs per record of the backfill's pure work (the
    `snapshot` workload of bench/instructions.py, timed; best of three rounds).

    The same code's CPU per record moves by 2x between this machine's phases (memory, not
    arithmetic: docs/performance-log.md, sessions 14 and 17), which no load average shows. This
    figure, printed beside every result, says which phase a run met: about 19.5 in the slow
    phase of 2026-12-04. It does not predict a run closely enough to correct its figures."""
    from bench.instructions import repo_car, run_snapshot

    car = repo_car()
    run_snapshot(car, 200)  # imports and caches
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        done = run_snapshot(car, SPEED_RECORDS)
        best = min(best, (time.perf_counter() - t0) / done)
    return best * 1e6


_load_at_start: tuple[float, float, float] | None = None


def load_at_start() -> tuple[float, float, float]:
    """(busy cores, 1-minute load average, machine_speed_us) when the bench started: call
    it first thing in main(), before the bench's own preparation (a devnet building repos, a
    relay generating frames) loads the machine."""
    global _load_at_start
    if _load_at_start is None:
        busy, loadavg = _busy_cores_now(), os.getloadavg()[0]
        _load_at_start = (busy, loadavg, machine_speed_us())
    return _load_at_start


class MachineLoad:
    """The load around one measurement: the busy cores when the bench started (see
    load_at_start), and the CPU the machine's OTHER processes used while the measurement ran
    (busy CPU of the whole machine minus the CPU of the processes the benchmark measures, per
    second of wall time)."""

    def __init__(self) -> None:
        self.busy_before, self.loadavg_before, self.speed_us = load_at_start()
        self._busy0 = _busy_cpu_s()
        self._t0 = time.monotonic()
        self.foreign_cores: float | None = None
        self.loadavg_after: float | None = None

    def stop(self, own_cpu_s: float) -> None:
        wall = max(time.monotonic() - self._t0, 1e-9)
        self.foreign_cores = max(0.0, (_busy_cpu_s() - self._busy0 - own_cpu_s) / wall)
        self.loadavg_after = os.getloadavg()[0]

    @property
    def quiet(self) -> bool:
        return (
            self.busy_before <= MAX_CLAIM_LOAD and (self.foreign_cores or 0.0) <= MAX_FOREIGN_CORES
        )

    def fields(self) -> dict[str, Any]:
        return {
            "busy_cores_before": round(self.busy_before, 2),
            "loadavg_1m_before": round(self.loadavg_before, 2),
            "loadavg_1m_after": round(self.loadavg_after or 0.0, 2),
            "foreign_cpu_cores": round(self.foreign_cores or 0.0, 2),
            "machine_us_per_record": round(self.speed_us, 2),
            "cores": os.cpu_count(),
            "claimed": self.quiet,
        }

    def describe(self) -> str:
        return (
            f"load: {self.busy_before:.2f} cores busy before the bench (1-minute load average "
            f"{self.loadavg_before:.2f}), other processes used {self.foreign_cores or 0.0:.2f} "
            f"cores while it ran ({os.cpu_count()} cores); this machine's speed before it: "
            f"{self.speed_us:.1f} µs per record of the backfill's pure work"
        )


def claim(load: MachineLoad, line: str) -> str:
    """`line` (a throughput figure) if the machine was quiet, else a warning in its place.
    CPU time per event/record stays meaningful under load and is printed either way."""
    if load.quiet:
        return line
    return (
        f"WARNING: not claimed, the machine was busy (load {load.busy_before:.2f} > "
        f"{MAX_CLAIM_LOAD:g} before, or other processes {load.foreign_cores or 0.0:.2f} > "
        f"{MAX_FOREIGN_CORES:g} cores during the run); measured: {line}"
    )


ROOT = Path(__file__).resolve().parents[1]
_DEVNET_URLS = {
    "relay": re.compile(r"devnet relay listening on (ws://\S+)"),
    "plc": re.compile(r"devnet PLC directory on (http://\S+)"),
}
DEVNET_START_S = 600


def start_history_devnet(
    tmp: Path, seed: int, repo_args: list[str], what: str, *, truth: bool = False
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A devnet subprocess serving the repos `repo_args` ask for (one account, one event on
    the firehose); returns once every repo is built (and the truth file written, with
    `truth`), with the relay and PLC URLs."""
    log = tmp / "devnet.log"
    truth_path = tmp / "truth.json"
    args = [
        sys.executable, "-m", "firehose.devnet", "--port", "0", "--seed", str(seed),
        "--accounts", "1", "--events", "1", *repo_args,
    ]  # fmt: skip
    if truth:
        args += ["--truth", str(truth_path)]
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"devnet exited: {log.read_text()[-2000:]}")
        text = log.read_text()
        if "devnet generated" in text and (not truth or truth_path.exists()):
            urls = {k: m.group(1) for k, rx in _DEVNET_URLS.items() if (m := rx.search(text))}
            break
        if time.monotonic() - started > DEVNET_START_S:
            proc.kill()
            raise SystemExit(f"devnet did not start in {DEVNET_START_S} s")
        time.sleep(0.2)
    print(f"devnet: {what} built in {time.monotonic() - started:.0f} s")
    return proc, urls


def backfill_env(dsn: str, urls: dict[str, str], days: int, profile: str) -> dict[str, str]:
    """The environment of a `firehose backfill run` against a devnet (loopback allowed)."""
    return {
        "DATABASE_URL": dsn,
        "RELAY_URL": urls["relay"],
        "PLC_URL": urls["plc"],
        "ALLOW_PRIVATE_NETWORK": "true",
        "BACKFILL_DAYS": str(days),
        "BACKFILL_PROFILE": profile,
        "METRICS_PORT": "0",
        "LOG_LEVEL": "INFO",
    }
