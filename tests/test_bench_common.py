"""bench/common.py: the load and machine speed printed beside every benchmark figure."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common


def test_machine_speed_is_microseconds_per_record() -> None:
    speed = common.machine_speed_us()
    # The backfill's pure work on a real repo: microseconds per record on any machine that
    # runs the tests, never nothing and never seconds.
    assert math.isfinite(speed)
    assert 0.5 < speed < 5_000


def test_every_figure_names_the_speed_it_met(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_load_at_start", (0.1, 0.2, 12.345))
    load = common.MachineLoad()
    load.stop(own_cpu_s=0.0)
    assert load.fields()["machine_us_per_record"] == 12.35
    assert "12.3 µs per record of the backfill's pure work" in load.describe()
