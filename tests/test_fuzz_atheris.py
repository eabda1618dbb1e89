"""The atheris harness (tests/fuzz/atheris_targets.py) stays runnable: it imports without
atheris, its seeds are the hypothesis tests' seeds, and its entry point takes every seed
(and a few hostile ones) the way libFuzzer will call it. With atheris installed, a short
real run proves it starts and finds nothing in a few thousand inputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz import atheris_targets
from fuzz.corpus import car_seeds, frame_seeds, record_seeds, repo_cars
from fuzz.targets import TRIED

HARNESS = Path(atheris_targets.__file__)


def test_seeds_and_entry_points_cover_every_target(tmp_path: Path) -> None:
    assert atheris_targets.seeds_for("frames") == frame_seeds()
    assert atheris_targets.seeds_for("car") == car_seeds()
    assert atheris_targets.seeds_for("mst") == repo_cars()
    assert atheris_targets.seeds_for("records") == record_seeds()
    everything = atheris_targets.seeds_for("all")
    assert len(everything) == sum(
        len(atheris_targets.seeds_for(t)) for t in atheris_targets.TARGET_NAMES
    )
    written = atheris_targets.write_seeds("all", tmp_path / "corpus")
    assert written == len(everything)
    assert len(list((tmp_path / "corpus").iterdir())) == len(set(everything))

    entry = atheris_targets.one_input_for("all")
    before = TRIED.copy()
    for data in (*everything, b"", b"\x00", b"\x01\xff", b"\x02" + b"\x9f" * 100):
        entry(data)
    for name in atheris_targets.TARGET_NAMES:
        assert TRIED[name] > before[name], name


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris not installed (optional: pip install atheris)",
)
def test_atheris_runs_a_short_campaign(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "all", "-runs=3000", str(tmp_path / "corpus")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr
