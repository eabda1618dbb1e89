"""Coverage-guided fuzzing of every target with atheris (by hand; pytest runs only the
import and seed checks in tests/test_fuzz_atheris.py).

    pip install atheris            # a manylinux wheel exists for CPython 3.11
    python tests/fuzz/atheris_targets.py frames -max_total_time=600 /tmp/corpus-frames
    python tests/fuzz/atheris_targets.py all -max_total_time=3600

The first argument picks the target (``frames``, ``car``, ``mst``, ``records``, or ``all``:
the first input byte then selects one). The corpus directory, if given, is filled with the
same real seeds as the hypothesis tests (tests/fuzz/corpus.py) before libFuzzer starts, so
coverage grows from real frames and CARs instead of from nothing; libFuzzer adds what it
finds there. Any exception other than the targets' typed errors is a finding: atheris
prints it with the input and writes the crashing bytes to ``crash-<sha1>``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The firehose and fuzz modules are imported inside the functions, so that `main` can
# import them under atheris.instrument_imports() (coverage of exactly the code under test).
TARGET_NAMES = ("car", "frames", "mst", "records")


def seeds_for(target: str) -> tuple[bytes, ...]:
    """The seed corpus of a target (``all``: every seed, prefixed with its target byte)."""
    from fuzz.corpus import car_seeds, frame_seeds, record_seeds, repo_cars

    if target == "all":
        out: list[bytes] = []
        for i, name in enumerate(TARGET_NAMES):
            out += [bytes([i]) + seed for seed in seeds_for(name)]
        return tuple(out)
    return {
        "frames": frame_seeds,
        "car": car_seeds,
        "mst": repo_cars,
        "records": record_seeds,
    }[target]()


def one_input_for(target: str) -> Callable[[bytes], None]:
    """The libFuzzer entry point: bytes in, a typed outcome or a raised finding."""
    from fuzz.targets import DISPATCH

    if target != "all":
        return DISPATCH[target]

    def dispatch(data: bytes) -> None:
        if data:
            DISPATCH[TARGET_NAMES[data[0] % len(TARGET_NAMES)]](data[1:])

    return dispatch


def write_seeds(target: str, folder: Path) -> int:
    """Put the seeds into a libFuzzer corpus folder (named by content hash: idempotent)."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seeds_for(target)
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return len(seeds)


def main(argv: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]  # optional: installed by hand

    target = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else "all"
    args = [argv[0]] + [a for a in argv[1:] if a != target]
    with atheris.instrument_imports(include=["firehose", "backfill"]):
        entry = one_input_for(target)
    for arg in args[1:]:
        if not arg.startswith("-"):
            print(f"seeded {write_seeds(target, Path(arg))} inputs into {arg}", file=sys.stderr)
    atheris.Setup(args, entry)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
