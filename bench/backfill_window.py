"""Window backfill benchmark (issue 9): what a ``BACKFILL_DAYS=30`` backfill downloads on a
modeled network, with the narrowing on and off, in one run.

A devnet subprocess serves REPOS accounts of its year history model (firehose/devnet/model.py:
repos grown commit by commit over the 365 days before now, ~85% dormant for 35+ days,
~8.5% casual, ~6% daily, a few heavy; building 2,000 takes ~15-30 s on 2 cores, before any
clock starts). Then two jobs run one after the other, each a real
``python -m firehose backfill run`` subprocess against its own fresh embedded PostgreSQL,
``BACKFILL_DAYS=30``, profile ``unthrottled`` unless told otherwise:

1. ``narrowed``: the defaults: dormant repos skipped (listRepos ``rev``), each repo
   downloaded with ``getRepo?since=`` (only the window's blocks), profiles through getRecord;
2. ``whole``: the narrowing off (``BACKFILL_SKIP_DORMANT=false``, ``BACKFILL_SINCE=false``,
   ``BACKFILL_BY_COLLECTION=false``): every active repo downloaded whole, the window filter
   alone keeps the window's records (the behaviour before issue 9).

Per job: bytes downloaded (the job's ``bytes_downloaded``, and the response bytes the devnet
sent for getRepo and getRecord), repos downloaded (distinct DIDs asked with getRepo), dormant
repos downloaded (those DIDs whose latest rev is older than the job's cutoff, from the truth
file), requests (every XRPC request the relay and PDS hosts answered, by method), wall time
(process start to exit) and records/s. Also the bytes of the window's own blocks
(`firehose.devnet.truth.window_bytes` for the job's `since`).

Targets (issue 9), each printed PASS or FAIL (they are byte and repo counts: the load does not
change them):

* the narrowed job downloads >= 10x fewer bytes than the whole-repo job;
* the narrowed job downloads <= 1.5x the bytes of the window's own blocks;
* 0 dormant repos downloaded by the narrowed job.

Wall time and records/s are claimed only on a quiet machine (bench.common.MachineLoad: load
average before the run and other processes' CPU during each job at most 1); otherwise a
warning is printed in their place. Then one JSON line ``{"bench": "backfill_window", ...}``.
The exit status is 1 if a target failed.

    python bench/backfill_window.py [--repos 2000] [--seed 5] [--days 30] [--profile-name P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backfill.window import Window  # noqa: E402
from bench.common import (  # noqa: E402
    CpuTracker,
    MachineLoad,
    backfill_env,
    claim,
    cpu_s,
    postgres_processes,
    start_history_devnet,
)
from firehose.devnet.truth import dormant_dids, window_bytes  # noqa: E402
from firehose.storage.embedded import start_embedded  # noqa: E402

# Issue 9's targets.
MIN_BYTES_SAVING = 10.0  # whole-repo bytes / narrowed bytes
MAX_WINDOW_FACTOR = 1.5  # narrowed bytes / the window's own block bytes
NARROWING_OFF = {
    "BACKFILL_SKIP_DORMANT": "false",
    "BACKFILL_SINCE": "false",
    "BACKFILL_BY_COLLECTION": "false",
}
DOWNLOAD_METHODS = ("com.atproto.sync.getRepo", "com.atproto.sync.getRecord")


def devnet_stats(relay_url: str) -> dict[str, Any]:
    base = "http://" + relay_url.removeprefix("ws://")
    with urllib.request.urlopen(base + "/devnet/stats", timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def get_repo_dids(stats: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for host in stats["hosts"]:
        for did, n in host["get_repo"].items():
            counts[did] = counts.get(did, 0) + int(n)
    return counts


def method_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{nsid: {requests, bytes}} answered between two /devnet/stats readings."""
    out: dict[str, dict[str, int]] = {}
    for nsid, now in after["methods"].items():
        then = before["methods"].get(nsid, {})
        delta = {k: int(now.get(k, 0)) - int(then.get(k, 0)) for k in ("requests", "bytes")}
        if delta["requests"]:
            out[nsid] = delta
    return out


async def job_row(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1")
        return dict(row) if row else {}
    finally:
        await conn.close()


def run_job(
    name: str, tmp: Path, urls: dict[str, str], truth: dict[str, Any], args: argparse.Namespace,
    extra_env: dict[str, str], devnet: psutil.Process,
) -> dict[str, Any]:  # fmt: skip
    """One `firehose backfill run` against a fresh embedded PostgreSQL; its figures."""
    pg_dir = tmp / f"pg-{name}"
    pg = start_embedded(pg_dir)
    try:
        env = {
            **os.environ,
            **backfill_env(pg.dsn, urls, args.days, args.profile_name),
            **extra_env,
        }
        before = devnet_stats(urls["relay"])
        pg_procs: Callable[[], list[psutil.Process]] = lambda: postgres_processes(pg_dir)  # noqa: E731
        pg_cpu = CpuTracker(pg_procs)
        devnet_cpu0 = cpu_s([devnet])
        load = MachineLoad()
        log = tmp / f"backfill-{name}.log"
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "firehose", "backfill", "run"],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        bf = psutil.Process(proc.pid)
        bf_cpu = 0.0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                bf_cpu = cpu_s([bf])
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        own_cpu = bf_cpu + pg_cpu.stop() + cpu_s([devnet]) - devnet_cpu0
        load.stop(own_cpu)
        if proc.returncode != 0:
            raise SystemExit(f"{name} backfill exited {proc.returncode}: {log.read_text()[-3000:]}")
        after = devnet_stats(urls["relay"])
        job = asyncio.run(job_row(pg.dsn))
    finally:
        pg.stop()
    since = Window(job["cutoff"]).since
    assert since is not None
    methods = method_delta(after, before)
    fetched = {d for d, n in get_repo_dids(after).items() if n - get_repo_dids(before).get(d, 0)}
    dormant = set(dormant_dids(truth, since))
    records = int(job["records_processed"])
    return {
        "status": job["status"],
        "repos_listed": int(job["repos_total"]) + int(job.get("repos_skipped_dormant") or 0),
        "repos_skipped_dormant": int(job.get("repos_skipped_dormant") or 0),
        "repos_downloaded": len(fetched),
        "dormant_repos_downloaded": len(fetched & dormant),
        "repos_failed": int(job["repos_failed"]),
        "bytes_downloaded": int(job["bytes_downloaded"]),
        "bytes_sent": sum(methods.get(m, {}).get("bytes", 0) for m in DOWNLOAD_METHODS),
        "window_bytes": window_bytes(truth, since),
        "requests": sum(m["requests"] for m in methods.values()),
        "requests_by_method": {k.rsplit(".", 1)[1]: v["requests"] for k, v in methods.items()},
        "plc_requests": int(after.get("plc_requests", 0)) - int(before.get("plc_requests", 0)),
        "records": records,
        "elapsed_s": round(elapsed, 2),
        "records_per_s": round(records / elapsed) if elapsed > 0 else 0,
        "cpu_s_backfill": round(bf_cpu, 1),
        "load": load,
    }


def print_job(name: str, r: dict[str, Any]) -> None:
    load: MachineLoad = r["load"]
    print(f"{name}: job {r['status']}")
    print(
        f"  repos: {r['repos_listed']:,} listed, {r['repos_skipped_dormant']:,} skipped dormant, "
        f"{r['repos_downloaded']:,} downloaded ({r['dormant_repos_downloaded']:,} dormant), "
        f"{r['repos_failed']} failed"
    )
    print(
        f"  bytes downloaded: {r['bytes_downloaded']:,} (devnet sent {r['bytes_sent']:,}; "
        f"the window's own blocks: {r['window_bytes']:,})"
    )
    by_method = ", ".join(f"{k} {v:,}" for k, v in sorted(r["requests_by_method"].items()))
    print(f"  requests: {r['requests']:,} ({by_method}); PLC {r['plc_requests']:,}")
    print(f"  records written: {r['records']:,}; CPU s (backfill process): {r['cpu_s_backfill']}")
    print("  " + load.describe())
    print("  " + claim(load, f"wall time: {r['elapsed_s']} s"))
    print("  " + claim(load, f"records/s: {r['records_per_s']:,}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repos", type=int, default=2000, help="history-model accounts")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--days", type=int, default=30, help="BACKFILL_DAYS (> 0)")
    parser.add_argument("--profile-name", default="unthrottled", help="BACKFILL_PROFILE")
    args = parser.parse_args()
    if args.days <= 0:
        parser.error("--days must be > 0: the narrowing needs a cutoff")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        devnet, urls = start_history_devnet(
            tmp,
            args.seed,
            ["--history-model", "year", "--model-accounts", str(args.repos)],
            f"{args.repos:,} history-model repos",
            truth=True,
        )
        try:
            truth = json.loads((tmp / "truth.json").read_text())
            proc = psutil.Process(devnet.pid)
            narrowed = run_job("narrowed", tmp, urls, truth, args, {}, proc)
            whole = run_job("whole", tmp, urls, truth, args, NARROWING_OFF, proc)
        finally:
            devnet.terminate()
            devnet.wait(10)

    print_job("narrowed (defaults)", narrowed)
    print_job("whole (BACKFILL_SKIP_DORMANT/SINCE/BY_COLLECTION=false)", whole)
    saving = whole["bytes_downloaded"] / max(narrowed["bytes_downloaded"], 1)
    factor = narrowed["bytes_downloaded"] / max(narrowed["window_bytes"], 1)
    targets = {
        "bytes_saving": (saving >= MIN_BYTES_SAVING, f"{saving:.1f}x fewer bytes than whole "
                         f"downloads (target >= {MIN_BYTES_SAVING:g}x)"),
        "window_factor": (factor <= MAX_WINDOW_FACTOR, f"{factor:.2f}x the window's own bytes "
                          f"(target <= {MAX_WINDOW_FACTOR:g}x)"),
        "no_dormant": (narrowed["dormant_repos_downloaded"] == 0,
                       f"{narrowed['dormant_repos_downloaded']} dormant repos downloaded "
                       "(target 0)"),
    }  # fmt: skip
    for ok, line in targets.values():
        print(f"{'PASS' if ok else 'FAIL'}: {line}")
    # No download can send less than the window's blocks, so on this model the saving is at
    # most (every repo whole) / (the window's blocks): if that is under 10x, the first
    # target measures the model, not the backfill.
    modeled_whole = sum(entry["car_bytes"] for entry in truth["history"].values())
    ceiling = modeled_whole / max(narrowed["window_bytes"], 1)
    print(
        f"the model's ceiling: every repo whole is {modeled_whole:,} bytes, "
        f"{ceiling:.1f}x the window's own blocks (the most any narrowing can save here)"
    )
    print(
        f"records written: narrowed {narrowed['records']:,}, whole {whole['records']:,} (the "
        "whole job also downloads the dormant repos, so it keeps their profiles: current state)"
    )

    def fields(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "load"} | r["load"].fields()

    result = {
        "bench": "backfill_window",
        "repos": args.repos,
        "days": args.days,
        "seed": args.seed,
        "profile": args.profile_name,
        "narrowed": fields(narrowed),
        "whole": fields(whole),
        "bytes_saving": round(saving, 2),
        "window_factor": round(factor, 3),
        "model_ceiling": round(ceiling, 2),
        "targets": {k: ok for k, (ok, _) in targets.items()},
    }
    print(json.dumps(result))
    if not all(ok for ok, _ in targets.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
