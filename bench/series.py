"""A series of benchmark runs: each run's figure beside its load, the median, old against new.

One run of `bench/backfill.py` moves by about ±10 % on this 2-core machine, and the machine's
own speed by 2x or more between its phases, which no load average shows (docs/performance.md,
"How to measure"). So a target is judged on a series of runs, and a change on runs alternated
with the code before it in the same minutes, never on runs of different hours. This runs one
bench `--runs` times, each once the 1-minute load average has fallen under `--quiet-below`
(the previous run's own cores leave it high for a while); with `--against REV` it runs the
same bench on REV too (a git worktree, removed at the end), in pairs ordered old, new, new,
old, ... so that a drift of the machine within the series weighs on both sides alike.

Each run's figure comes from the bench's JSON line (`--figure`, by default `records_per_s`
for `backfill` and `events_per_s` for `live`). Printed per run: which code, the figure, the
load average and the machine's speed check before it, whether the bench claimed it (and the
live bench's ratio to its baseline, and peak RSS, where the bench prints them); then per
side the runs, median, range and how many reached `--target`; with `--against`, the ratio of
the sums over the complete pairs. Then one JSON line {"bench": "series", ...}. A run that
fails ends the series with its output's tail.

With `--fast-below US`, each run also waits until the machine's speed check (bench/common.py,
`machine_speed_us`) reads under US µs per record, checked every FAST_POLL_S, so that a series
started in a slow phase runs when a fast one comes; when none has come after
`--fast-wait-max-s`, the series ends there with the runs it has.

    python bench/series.py [--runs 6] [--against REV] [--target 50000] [--figure KEY]
                           [--quiet-below 0.45] [--fast-below 17 [--fast-wait-max-s 10800]]
                           -- bench/backfill.py [its arguments]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEW, OLD = "new", "old"
DEFAULT_FIGURES = {"backfill": "records_per_s", "live": "events_per_s"}
# Shown beside each run's figure when its bench reports them: the other halves of the targets.
ALSO_SHOWN = ("ratio_to_baseline", "peak_rss_mb")
QUIET_POLL_S = 5.0
QUIET_MAX_WAIT_S = 600.0  # then the run starts anyway: the bench's own claim still says
FAST_POLL_S = 60.0  # a speed check takes about a second of one core
FAST_REPORT_EVERY_S = 600.0  # one line per ten minutes of waiting for a fast phase


# --- pure parts ------------------------------------------------------------------------------


def bench_result(stdout: str) -> dict[str, Any]:
    """The bench's JSON line: the last line that is a JSON object with a "bench" key."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict) and "bench" in value:
                return value
    raise ValueError("the bench printed no JSON line")


def run_order(runs: int, against: bool) -> list[str]:
    """Which code each run is: `runs` of the new code, or `runs` pairs old, new, new, old."""
    if not against:
        return [NEW] * runs
    pairs = [(OLD, NEW) if i % 2 == 0 else (NEW, OLD) for i in range(runs)]
    return [side for pair in pairs for side in pair]


def side_summary(values: list[float], target: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runs": len(values),
        "median": statistics.median(values) if values else None,
        "min": min(values, default=None),
        "max": max(values, default=None),
    }
    if target is not None:
        out["at_target"] = sum(1 for v in values if v >= target)
    return out


def pair_ratio(sides: list[str], values: list[float]) -> float | None:
    """Sum of new over sum of old, over the complete pairs (runs 2k and 2k+1)."""
    new = old = 0.0
    for i in range(0, len(sides) - 1, 2):
        pair = dict(zip(sides[i : i + 2], values[i : i + 2], strict=True))
        if set(pair) == {NEW, OLD}:
            new, old = new + pair[NEW], old + pair[OLD]
    return new / old if old else None


# --- running ---------------------------------------------------------------------------------


def wait_quiet(below: float) -> None:
    """Wait until the 1-minute load average is under `below` (at most QUIET_MAX_WAIT_S)."""
    deadline = time.monotonic() + QUIET_MAX_WAIT_S
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(QUIET_POLL_S)


def machine_speed_us() -> float:
    """bench/common.py's speed check, imported when asked for: this script also runs alone
    (its tests copy it into a throwaway repository)."""
    sys.path.insert(0, str(ROOT))
    from bench.common import machine_speed_us as speed

    return speed()


def wait_fast(
    below_us: float, max_wait_s: float, speed: Callable[[], float] = machine_speed_us
) -> float | None:
    """Wait until `speed()` (µs per record) reads under `below_us`: that reading, or None
    when `max_wait_s` passed first. Says every FAST_REPORT_EVERY_S what it waits for."""
    started = time.monotonic()
    reported = started
    while True:
        us = speed()
        if us < below_us:
            return us
        now = time.monotonic()
        if now + FAST_POLL_S - started > max_wait_s:
            return None
        if now - reported >= FAST_REPORT_EVERY_S or reported == started:
            print(f"speed check {us:.1f} µs per record: waiting for under {below_us}", flush=True)
            reported = now
        time.sleep(FAST_POLL_S)


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """REV checked out beside this tree's `../shared`, as a bench of REV expects to find it."""
    with tempfile.TemporaryDirectory(prefix="series-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev],
            check=True,
        )
        shared = ROOT.parent / "shared"
        if shared.exists():
            (Path(tmp) / "shared").symlink_to(shared)
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
            )


def run_bench(tree: Path, command: list[str]) -> dict[str, Any]:
    """`command` (a bench script and its arguments) run with `tree`'s copy of the script."""
    script = tree / command[0]
    proc = subprocess.run(
        [sys.executable, str(script), *command[1:]],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"{command[0]} in {tree} exited {proc.returncode}:\n{tail}")
    return bench_result(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="runs (pairs with --against)")
    parser.add_argument("--against", metavar="REV", help="alternate with the bench on REV")
    parser.add_argument("--target", type=float, help="count the runs at or above this")
    parser.add_argument("--figure", help="the JSON key to compare (default: by bench)")
    parser.add_argument("--quiet-below", type=float, default=0.45, help="load average")
    parser.add_argument(
        "--fast-below", type=float, metavar="US", help="wait for a speed check under US µs"
    )
    parser.add_argument("--fast-wait-max-s", type=float, default=3 * 3600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- bench/X.py [args]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the bench to run after --, e.g. -- bench/backfill.py")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    sides = run_order(args.runs, args.against is not None)
    values: list[float] = []
    results: list[dict[str, Any]] = []
    figure = args.figure
    with contextlib.ExitStack() as stack:
        trees = {NEW: ROOT}
        if args.against:
            trees[OLD] = stack.enter_context(worktree(args.against))
        for i, side in enumerate(sides, 1):
            if args.fast_below is not None:
                wait_quiet(args.quiet_below)
                if wait_fast(args.fast_below, args.fast_wait_max_s) is None:
                    print(
                        f"no speed check under {args.fast_below} µs in "
                        f"{args.fast_wait_max_s:.0f} s: the series ends after {i - 1} runs",
                        flush=True,
                    )
                    sides = sides[: i - 1]
                    break
            wait_quiet(args.quiet_below)
            result = run_bench(trees[side], command)
            figure = figure or DEFAULT_FIGURES.get(str(result["bench"]))
            if figure is None or figure not in result:
                raise SystemExit(f"no figure {figure!r} in the JSON line; give --figure")
            values.append(float(result[figure]))
            results.append(result)
            extra = "".join(f", {k} {result[k]}" for k in ALSO_SHOWN if k in result)
            # The bench's own load and speed check, taken as it started: one figure per run,
            # the one its JSON line and its own printout carry.
            print(
                f"run {i}/{len(sides)} {side}: {figure} {values[-1]:,.0f}{extra} (load "
                f"{result.get('loadavg_1m_before', '?')} before; speed check "
                f"{result.get('machine_us_per_record', '?')} µs; "
                f"{'claimed' if result.get('claimed') else 'NOT claimed'})",
                flush=True,
            )
    if not values:
        raise SystemExit("no run")
    out: dict[str, Any] = {"bench": "series", "command": command, "figure": figure}
    for side in dict.fromkeys(sides):
        mine = [v for s, v in zip(sides, values, strict=True) if s == side]
        out[side] = side_summary(mine, args.target)
        s = out[side]
        reached = (
            f", {s['at_target']} of {s['runs']} at {args.target:,.0f} or more"
            if args.target is not None
            else ""
        )
        print(
            f"{side}: {s['runs']} runs, median {s['median']:,.0f}, "
            f"{s['min']:,.0f} to {s['max']:,.0f}{reached}"
        )
    if args.against:
        out["against"] = args.against
        out["ratio_new_to_old"] = pair_ratio(sides, values)
        if out["ratio_new_to_old"] is not None:
            print(f"new / old, summed over the pairs: {out['ratio_new_to_old']:.3f}x")
    out["runs"] = [
        {"side": s, "value": v, "claimed": r.get("claimed"), "load": r.get("loadavg_1m_before"),
         "speed_us": r.get("machine_us_per_record"), **{k: r[k] for k in ALSO_SHOWN if k in r}}
        for s, v, r in zip(sides, values, results, strict=True)
    ]  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
