"""Devnet generation speed: events/s of `firehose.devnet.Generator` (wall and CPU time).

    python bench/gen_frames.py [--events 50000] [--accounts 200] [--seed 1]

Prints a human line and a JSON line. CPU time is reported too because on a shared machine
wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MachineLoad, claim, load_at_start  # noqa: E402
from firehose.devnet.generator import Generator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    load_at_start()

    generator = Generator(seed=args.seed, accounts=args.accounts)
    load = MachineLoad()
    wall, cpu = time.perf_counter(), time.process_time()
    frames = generator.frames(args.events)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load.stop(cpu)
    size = sum(map(len, frames))
    print(load.describe())
    print(
        claim(
            load,
            f"{args.events} events in {wall:.2f} s wall ({args.events / wall:.0f}/s), "
            f"{cpu:.2f} s CPU ({args.events / cpu:.0f}/s); {size / args.events:.0f} B/frame",
        )
    )
    print(
        json.dumps(
            {
                "bench": "gen_frames",
                "events": args.events,
                "events_per_s_wall": round(args.events / wall),
                "events_per_s_cpu": round(args.events / cpu),
                "bytes_per_frame": round(size / args.events),
                **load.fields(),
            }
        )
    )


if __name__ == "__main__":
    main()
