"""End-to-end backfill helpers: the devnet's HTTP side and backfill processes as subprocesses.

* `HistoryDevnet.start(tmp, *flags)` runs `python -m firehose.devnet` and parses every URL
  line it prints (relay, PLC directory, PDS hosts); `stats()` reads `/devnet/stats`.
* `BackfillProcess.start(tmp, dsn, devnet, ...)` runs `python -m firehose backfill run` or
  the unified worker (`python -m firehose run`) with the devnet's RELAY_URL / PLC_URL.
* `expected_in_window`, `job_row`, `repo_rows`, `records_map`, `sample_rss`: what the tests
  compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import websockets
from support import wait_for_cursor

from firehose.model import Action, CommitEvent
from firehose.protocol.frames import decode_frame

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# The real repository CARs of tests/fixtures/README.md, with their record counts.
REAL_CARS = {
    FIXTURES / "indigo/atproto/repo/testdata/bnewbold.robocracy.org.20250310005405.car": 38,
    FIXTURES / "rsky/rsky-repo/resources/test/valid_repo.car": 6,
    FIXTURES / "arroba/arroba/tests/snarfed2.car": 5,
}
_RELAY = re.compile(r"devnet relay listening on (ws://\S+)")
_PLC = re.compile(r"devnet PLC directory on (http://\S+)")
_PDS = re.compile(r"devnet PDS (\d+) on (http://\S+)")
_GENERATED = re.compile(r"devnet generated (\d+) events")
_PROGRESS = re.compile(r"\[BACKFILL\] Progress: (\d+) received, (\d+) processed")


def processed_counts(log: str) -> list[int]:
    """The `processed` figure of each `[BACKFILL] Progress:` line of `log`, in order."""
    return [int(processed) for _, processed in _PROGRESS.findall(log)]


@dataclass
class HistoryDevnet:
    proc: subprocess.Popen[str]
    relay_url: str
    plc_url: str
    pds_urls: list[str]
    truth_path: Path
    log_path: Path

    @classmethod
    def start(
        cls, tmp: Path, *flags: str, wait_generated: bool = True, timeout_s: float = 180
    ) -> HistoryDevnet:
        """Start the devnet; return once its URL lines are printed and (with
        `wait_generated`) every event exists and the truth file is written."""
        tmp.mkdir(parents=True, exist_ok=True)
        truth = tmp / "truth.json"
        log_path = tmp / "devnet.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "firehose.devnet", "--port", "0", "--truth", str(truth), *flags],
            cwd=ROOT,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"devnet exited: {log_path.read_text()[-2000:]}")
            text = log_path.read_text()
            relay, plc = _RELAY.search(text), _PLC.search(text)
            pds = sorted((int(i), url) for i, url in _PDS.findall(text))
            ready = relay and plc and pds and (not wait_generated or _GENERATED.search(text))
            if ready and relay and plc:
                return cls(proc, relay.group(1), plc.group(1), [u for _, u in pds], truth, log_path)
            time.sleep(0.05)
        proc.kill()
        raise TimeoutError("devnet did not start")

    @property
    def http_base(self) -> str:
        return "http://" + self.relay_url.removeprefix("ws://")

    def wait_generated(self, timeout_s: float = 120) -> dict[str, Any]:
        """Wait for the last event (paced devnets) and return the truth."""
        deadline = time.monotonic() + timeout_s
        while not _GENERATED.search(self.log_path.read_text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"devnet did not finish: {self.log_path.read_text()[-1000:]}")
            time.sleep(0.1)
        return self.truth()

    def truth(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.truth_path.read_text())
        return data

    def stats(self) -> dict[str, Any]:
        """`/devnet/stats` of the relay (every host's counters)."""
        with urllib.request.urlopen(self.http_base + "/devnet/stats", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def env(self) -> dict[str, str]:
        return {
            "RELAY_URL": self.relay_url,
            "PLC_URL": self.plc_url,
            "ALLOW_PRIVATE_NETWORK": "true",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def get_repo_counts(stats: dict[str, Any], key: str = "get_repo") -> dict[str, int]:
    """did -> getRepo requests (`get_repo`) or complete CARs sent (`get_repo_ok`), all hosts."""
    counts: dict[str, int] = {}
    for host in stats["hosts"]:
        for did, n in host[key].items():
            counts[did] = counts.get(did, 0) + int(n)
    return counts


@dataclass
class BackfillProcess:
    """`python -m firehose backfill run` (default) or the unified worker (`worker=True`)."""

    proc: subprocess.Popen[str]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        tmp: Path,
        dsn: str,
        devnet: HistoryDevnet,
        *,
        worker: bool = False,
        env: dict[str, str] | None = None,
        **more_env: str,
    ) -> BackfillProcess:
        log_path = tmp / f"{'worker' if worker else 'backfill'}-{time.monotonic_ns()}.log"
        full_env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            **devnet.env(),
            **(env or {}),
            **more_env,
        }
        argv = [sys.executable, "-m", "firehose"] + (["run"] if worker else ["backfill", "run"])
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        return cls(proc, log_path, argv)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{' '.join(self.argv[2:])} still running after {timeout_s} s:\n"
                + self.log()[-3000:]
            ) from None


def expected_in_window(truth: dict[str, Any], cutoff: datetime | None) -> dict[str, str]:
    """Records of active accounts (listRepos marks the inactive ones, which are skipped)
    whose time is inside the window or unknown (kept); all of them for cutoff None."""
    cutoff_us = None if cutoff is None else int(cutoff.timestamp() * 1_000_000)
    times = truth["record_times"]
    statuses = truth["statuses"]
    return {
        uri: cid
        for uri, cid in truth["records"].items()
        if statuses.get(uri.split("/")[2], "active") == "active"
        and (cutoff_us is None or times.get(uri) is None or times[uri] >= cutoff_us)
    }


async def job_row(dsn: str) -> dict[str, Any] | None:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1")
        return dict(row) if row is not None else None
    finally:
        await conn.close()


async def repo_rows(dsn: str) -> dict[str, dict[str, Any]]:
    """did -> its backfill_repos row (the latest job)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT r.* FROM backfill_repos r WHERE r.job_id = (SELECT max(id) FROM backfill_jobs)"
        )
        return {r["did"]: dict(r) for r in rows}
    finally:
        await conn.close()


async def records_map(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["uri"]: r["cid"] for r in await conn.fetch("SELECT uri, cid FROM records")}
    finally:
        await conn.close()


async def wait_job(
    dsn: str,
    status: str = "completed",
    *,
    timeout_s: float = 60,
    procs: tuple[BackfillProcess, ...] = (),
) -> dict[str, Any]:
    """Poll the job row until it has `status`; fail early if every process died."""
    deadline = time.monotonic() + timeout_s
    job = None
    while time.monotonic() < deadline:
        job = await job_row(dsn)
        if job is not None and job["status"] == status:
            return job
        if procs and not any(p.alive() for p in procs):
            logs = "\n".join(p.log()[-2000:] for p in procs)
            raise AssertionError(f"backfill processes exited, job {job}:\n{logs}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"job not {status} after {timeout_s} s: {job}")


def assert_records_equal(got: dict[str, str], want: dict[str, str]) -> None:
    missing = want.keys() - got.keys()
    extra = got.keys() - want.keys()
    wrong = [u for u in want.keys() & got.keys() if got[u] != want[u]]
    assert not missing, f"{len(missing)} of {len(want)} records missing, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} records not expected, e.g. {sorted(extra)[:3]}"
    assert not wrong, f"{len(wrong)} records with another cid, e.g. {wrong[:3]}"


async def check_window_truth(dsn: str, devnet: HistoryDevnet) -> dict[str, object]:
    """The completed job, after checking that the tables hold exactly the window's records of
    the devnet's truth and every repo is done."""
    job = await job_row(dsn)
    assert job is not None and job["status"] == "completed", job
    assert job["repos_failed"] == 0, job
    want = expected_in_window(devnet.truth(), job["cutoff"])
    assert want
    assert_records_equal(await records_map(dsn), want)
    rows = await repo_rows(dsn)
    assert rows and all(r["state"] == "done" for r in rows.values())
    return job


def backfill_cli(dsn: str, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m firehose backfill ARGS` against `dsn`."""
    return subprocess.run(
        [sys.executable, "-m", "firehose", "backfill", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


class RssSampler:
    """Samples a process's RSS (psutil) in a thread every `every_s` seconds."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        import threading

        import psutil

        self._proc = psutil.Process(pid)
        self._every_s = every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.samples.append(int(self._proc.memory_info().rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return
            self._stop.wait(self._every_s)

    def stop(self) -> int:
        """Stop sampling; the peak RSS in bytes."""
        self._stop.set()
        self._thread.join(5)
        return max(self.samples, default=0)


class LiveOps:
    """A firehose subscriber of a test's own: what the events after the history (seq above
    `history_events`) touched."""

    def __init__(self, history_events: int) -> None:
        self.history_events = history_events
        self.head = 0
        self.written: dict[str, int] = {}  # uri -> seq of its last create/update
        self.deleted: dict[str, int] = {}  # uri -> seq of its last delete
        self.dids: set[str] = set()  # repos with a live commit

    def add(self, event: Any) -> None:
        self.head = max(self.head, getattr(event, "seq", 0) or 0)
        if not isinstance(event, CommitEvent) or event.seq <= self.history_events:
            return
        self.dids.add(event.did)
        for w in event.writes:
            uri = f"at://{w.did}/{w.collection}/{w.rkey}"
            if w.action == Action.DELETE:
                self.deleted[uri] = event.seq
            else:
                self.written[uri] = event.seq

    async def follow(self, relay_url: str) -> None:
        url = relay_url + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
        async with websockets.connect(url, max_size=None) as ws:
            async for message in ws:
                assert isinstance(message, bytes)
                self.add(decode_frame(message))


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


async def first_repo_done(dsn: str, live: LiveOps, worker: BackfillProcess) -> int:
    """The live head when the first backfilled repo is done (polled: no timer raced)."""
    for _ in range(600):
        rows = await repo_rows(dsn)
        if any(r["state"] == "done" for r in rows.values()):
            return live.head
        assert worker.alive(), worker.log()[-2000:]
        await asyncio.sleep(0.1)
    raise TimeoutError("no repo backfilled within 60 s")


async def assert_converged_with_live(
    dsn: str, truth: dict[str, Any], cutoff: datetime, done: set[str], live: LiveOps
) -> dict[str, str]:
    """The tables after a window backfill beside live traffic: live writes win wherever they
    are (the live stream has no window); other records are there iff their repo was
    backfilled (`done`) and they are inside the window (the truth's record_times: profiles
    have none, current state), or their repo was resynced (the chain checks found a gap in
    its live commits, e.g. a commit while the worker held the account inactive: a resync
    writes the whole current repo, no window); none older; no live delete resurrected.
    Returns the records."""
    cutoff_us = int(cutoff.timestamp() * 1_000_000)
    times = truth["record_times"]
    conn = await asyncpg.connect(dsn)
    try:
        resynced = {
            r["did"] for r in await conn.fetch("SELECT did FROM repo_resyncs WHERE rev IS NOT NULL")
        }
    finally:
        await conn.close()

    def in_window(uri: str) -> bool:
        t = times.get(uri)
        return t is None or t >= cutoff_us

    def expected(uri: str) -> bool:
        did = uri.split("/")[2]
        return uri in live.written or did in resynced or (did in done and in_window(uri))

    want = {uri: cid for uri, cid in truth["records"].items() if expected(uri)}
    got = await records_map(dsn)
    old = [u for u in got if not in_window(u) and not expected(u)]
    assert not old, f"{len(old)} records older than the window, e.g. {old[:3]}"
    resurrected = set(truth["deleted"]) & got.keys()
    assert not resurrected, f"deleted records back: {sorted(resurrected)[:3]}"
    try:
        assert_records_equal(got, want)
    except AssertionError as exc:  # say what the backfill did with the repos concerned
        dids = sorted({u.split("/")[2] for u in got.keys() ^ want.keys()})[:5]
        rows = await repo_rows(dsn)
        states = {
            d: {k: rows[d][k] for k in ("state", "attempts", "error")} for d in dids if d in rows
        }
        raise AssertionError(f"{exc}; backfill_repos of those repos: {states}") from None
    assert any(not in_window(u) for u in truth["records"])  # the window cut records off
    return got


@dataclass
class LiveBackfillRun:
    job: dict[str, Any]
    truth: dict[str, Any]
    stats: dict[str, Any]
    live: LiveOps


async def backfill_beside_live(
    tmp_path: Path, db_dsn: str, flags: tuple[str, ...], history_events: int, events: int
) -> LiveBackfillRun:
    """A devnet (`flags`: its history phase is seq 1..`history_events`, then paced live
    events up to `events`) and a unified worker that follows the live stream from the end of
    the history while it backfills a 30-day window in small batches. Returns once the job is
    completed and the worker has committed every event. The overlap the tests need (live
    events still flowing after the first snapshot is written) is waited for, not raced."""
    net = HistoryDevnet.start(tmp_path / "devnet", *flags, wait_generated=False)
    live = LiveOps(history_events)
    follower = asyncio.create_task(live.follow(net.relay_url))
    worker = None
    try:
        await wait_until(lambda: live.head >= history_events, 60, "history phase")
        worker = BackfillProcess.start(
            tmp_path, db_dsn, net, worker=True,
            START_CURSOR=str(history_events), BACKFILL_DAYS="30",
            BACKFILL_PROFILE="aggressive", BACKFILL_BATCH_SIZE="20",
            BACKFILL_BATCH_DELAY_MS="50", BACKFILL_MAX_CONCURRENT="3",
        )  # fmt: skip
        head_at_first_snapshot = await first_repo_done(db_dsn, live, worker)
        assert head_at_first_snapshot < events, "the live traffic ended before any snapshot"
        job = await wait_job(db_dsn, timeout_s=120, procs=(worker,))
        truth = await asyncio.to_thread(net.wait_generated, 90)
        await wait_until(lambda: live.head >= truth["last_seq"], 30, "our subscriber")
        await wait_for_cursor(db_dsn, truth["last_seq"], timeout_s=60)
        stats = net.stats()
        # Every writer takes a repo's actors row before its rows (firehose/storage/fresh.py):
        # a live batch and a backfill batch of one repo never deadlock. Before, a few did per
        # run, and a backfill attempt failed that way could leave part of a repo behind.
        assert "deadlock detected" not in worker.log(), worker.log()[-3000:]
        assert worker.terminate() == 0
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
        if worker is not None:
            worker.terminate()
        net.stop()
    return LiveBackfillRun(job, truth, stats, live)


async def run_backfill_service(
    relay: Any, dsn: str, settings: Any, *, registry: Any = None, timeout_s: float = 120
) -> None:
    """A `BackfillService` (as `firehose backfill run` builds it) against an in-process
    `DevnetRelay` and its PLC directory, until its job ends."""
    from dataclasses import replace

    from prometheus_client import CollectorRegistry

    from backfill.service import BackfillService

    settings = replace(settings, plc_url=relay.network.plc_url)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
    try:
        service = BackfillService(
            settings, pool, registry if registry is not None else CollectorRegistry(),
            relay_url=relay.url, worker_id=0, live_pressure=None,
        )  # fmt: skip
        await asyncio.wait_for(service.run(asyncio.Event()), timeout_s)
    finally:
        await pool.close()


class WholeSnapshot:
    """What a fake snapshot (did, rev, data_cid, bytes_downloaded, writes, close) adds to be
    a `backfill.network.Snapshot`: a whole download of a known commit."""

    did: str
    rev: str
    data_cid: str
    kind = "whole"
    since_fallback: str | None = None
    absent_subtrees = 0
    absent_records = 0
    profile_fetch: str | None = None

    @property
    def head(self) -> tuple[str, str, str] | None:
        return (self.did, self.rev, self.data_cid)
