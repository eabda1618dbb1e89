"""bench/series.py: a bench run again and again, alternated with another commit's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import series
from bench.series import NEW, OLD, ROOT, bench_result, pair_ratio, run_order, side_summary


def test_the_json_line_is_the_last_bench_object() -> None:
    out = 'devnet: built\n{"bench": "backfill", "records_per_s": 1}\nnoise {\n{"x": 1}\n'
    assert bench_result(out) == {"bench": "backfill", "records_per_s": 1}
    with pytest.raises(ValueError, match="no JSON line"):
        bench_result("records/s committed: 52,000\n")


def test_pairs_alternate_so_a_drift_weighs_on_both_sides() -> None:
    assert run_order(3, against=False) == [NEW, NEW, NEW]
    assert run_order(3, against=True) == [OLD, NEW, NEW, OLD, OLD, NEW]


def test_summary_and_ratio() -> None:
    assert side_summary([3.0, 1.0, 2.0, 10.0], target=2.5) == {
        "runs": 4, "median": 2.5, "min": 1.0, "max": 10.0, "at_target": 2
    }  # fmt: skip
    sides = [OLD, NEW, NEW, OLD, OLD]  # the last run has no partner: left out
    assert pair_ratio(sides, [10.0, 11.0, 13.0, 12.0, 99.0]) == pytest.approx(24 / 22)
    assert pair_ratio([NEW, NEW], [1.0, 2.0]) is None


def test_waiting_for_a_fast_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(series, "FAST_POLL_S", 0.0)
    readings = iter([41.6, 25.0, 16.2, 99.0])
    # The first reading under the threshold ends the wait; slower ones are waited out.
    assert series.wait_fast(17.0, 3600, lambda: next(readings)) == 16.2
    assert next(readings) == 99.0  # no check after the fast one
    # Never fast within the time allowed: None, after a single check when none fits in it.
    calls = []
    assert series.wait_fast(17.0, 0, lambda: calls.append(1) or 41.6) is None
    assert len(calls) == 1


def test_the_speed_check_it_waits_for_is_the_benches_own() -> None:
    # The real check (bench/common.py), as the series calls it: a figure in µs per record.
    assert 0 < series.machine_speed_us() < 10_000


def test_a_series_against_a_commit_runs_each_sides_own_bench(tmp_path: Path) -> None:
    """The bench is the commit's own copy: a stand-in script committed in a throwaway
    repository prints a figure that differs between the two commits."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    series = (ROOT / "bench" / "series.py").read_text()
    (repo / "bench" / "series.py").write_text(series)
    fake = repo / "bench" / "fake.py"

    def commit(value: int) -> None:
        result = {"bench": "backfill", "records_per_s": value, "peak_rss_mb": 7, "claimed": True}
        fake.write_text(f"import json\nprint(json.dumps({result!r}))\n")
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
             "commit", "-q", "-m", str(value)], check=True,
        )  # fmt: skip

    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    commit(100)
    commit(125)
    proc = subprocess.run(
        [sys.executable, str(repo / "bench" / "series.py"), "--runs", "2", "--against",
         "HEAD~1", "--target", "110", "--quiet-below", "1000", "--", "bench/fake.py"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["side"] for r in out["runs"]] == [OLD, NEW, NEW, OLD]
    assert [r["value"] for r in out["runs"]] == [100, 125, 125, 100]
    assert out["new"]["at_target"] == 2 and out["old"]["at_target"] == 0
    assert out["ratio_new_to_old"] == pytest.approx(1.25)
    assert "new / old, summed over the pairs: 1.250x" in proc.stdout
    assert "run 2/4 new: records_per_s 125, peak_rss_mb 7 (load" in proc.stdout
    assert out["runs"][0]["peak_rss_mb"] == 7
    listed = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert len(listed.stdout.splitlines()) == 1, "the worktree is removed at the end"
