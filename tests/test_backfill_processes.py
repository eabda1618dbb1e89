"""BACKFILL_PROCESSES: parsing, the split of the limits, and the helper link's wire format
and pipes (backfill/helpers.py). The processes themselves: tests/test_e2e_backfill_helpers.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill.helpers import (
    HelperStart,
    ParentLink,
    decode_counts,
    decode_start,
    encode_counts,
    encode_start,
)
from backfill.progress import Counts, Progress
from backfill.settings import (
    AUTO_PROCESSES_MAX,
    MIN_PROCESS_MEMORY_MB,
    BackfillSettings,
    usable_cores,
)
from backfill.throttle import live_behind
from firehose.settings import ConfigError


def test_default_is_one_process_and_unthrottled_takes_one_per_core() -> None:
    assert BackfillSettings.from_env({}).processes == 1
    for profile in ("conservative", "moderate", "aggressive"):
        assert BackfillSettings.from_env({"BACKFILL_PROFILE": profile}).processes == 1
    auto = BackfillSettings.from_env({"BACKFILL_PROFILE": "unthrottled"})
    assert auto.processes == max(1, min(usable_cores(), AUTO_PROCESSES_MAX, 32, 2048 // 128))


def test_auto_respects_concurrency_and_memory() -> None:
    s = BackfillSettings.from_env(
        {
            "BACKFILL_PROCESSES": "auto",
            "BACKFILL_MAX_CONCURRENT": "1",
            "BACKFILL_MAX_MEMORY_MB": "4096",
        }
    )
    assert s.processes == 1
    s = BackfillSettings.from_env(
        {"BACKFILL_PROFILE": "unthrottled", "BACKFILL_MAX_MEMORY_MB": "200"}
    )
    assert s.processes == 1  # 200 MB leave no 128 MB for a second process


def test_explicit_number() -> None:
    s = BackfillSettings.from_env({"BACKFILL_PROCESSES": "2", "BACKFILL_MAX_CONCURRENT": "5"})
    assert s.processes == 2
    s = BackfillSettings.from_env({"BACKFILL_PROFILE": "unthrottled", "BACKFILL_PROCESSES": "1"})
    assert s.processes == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKFILL_PROCESSES": "0"}, "auto or an integer between 1 and 64"),
        ({"BACKFILL_PROCESSES": "65"}, "auto or an integer between 1 and 64"),
        ({"BACKFILL_PROCESSES": "two"}, "auto or an integer between 1 and 64"),
        ({"BACKFILL_PROCESSES": "3"}, "more than BACKFILL_MAX_CONCURRENT=2"),
        (
            {"BACKFILL_PROCESSES": "5", "BACKFILL_MAX_CONCURRENT": "9"},
            "leaves 102MB of BACKFILL_MAX_MEMORY_MB=512",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="BACKFILL_PROCESSES") as err:
        BackfillSettings.from_env(env)
    assert message in str(err.value)


@given(
    concurrent=st.integers(1, 1024),
    memory=st.integers(64, 1_048_576),
    processes=st.integers(1, 64),
)
def test_shares_add_up_to_the_totals(concurrent: int, memory: int, processes: int) -> None:
    """Whatever the limits, the N processes together never exceed what the user set, and
    each gets at least one repo in flight and its part of the memory."""
    env = {
        "BACKFILL_MAX_CONCURRENT": str(concurrent),
        "BACKFILL_MAX_MEMORY_MB": str(memory),
        "BACKFILL_PROCESSES": str(processes),
        "BACKFILL_DIDS": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        "BACKFILL_VACUUM": "true",
    }
    try:
        s = BackfillSettings.from_env(env)
    except ConfigError:
        assert processes > concurrent or memory // processes < MIN_PROCESS_MEMORY_MB
        return
    shares = [s.process_share(i) for i in range(processes)]
    assert sum(x.max_concurrent for x in shares) == concurrent
    assert all(x.max_concurrent >= 1 for x in shares)
    assert sum(x.max_memory_mb for x in shares) <= memory
    assert processes == 1 or all(x.max_memory_mb >= MIN_PROCESS_MEMORY_MB for x in shares)
    parent, helpers = shares[0], shares[1:]
    assert parent.processes == processes and parent.dids and parent.vacuum
    assert all(h.processes == 1 and not h.dids and not h.vacuum for h in helpers)
    with pytest.raises(ValueError):
        s.process_share(processes)


def test_start_and_counts_round_trip() -> None:
    s = BackfillSettings.from_env({"BACKFILL_PROCESSES": "2", "BACKFILL_MAX_CONCURRENT": "4"})
    start = HelperStart(
        job_id=7,
        backfill=s.process_share(1),
        dsn="postgresql://u:secret@db/atproto",
        pool_size=4,
        relay_url="https://relay.example",
        worker_id=0,
        wanted_collections=("app.bsky.feed.post",),
        live=True,
    )
    line = encode_start(start)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_start(line) == start
    counts = Counts(received=10, processed=8, skipped=2, bytes=12345)
    assert decode_counts(encode_counts(counts)) == counts


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b'{"received": 1}\n',
        b'{"received": -1, "processed": 0, "skipped": 0, "bytes": 0}\n',
        b'{"received": 1.5, "processed": 0, "skipped": 0, "bytes": 0}\n',
        b'{"received": "1", "processed": 0, "skipped": 0, "bytes": 0}\n',
    ],
)
def test_bad_counts_lines_are_refused(line: bytes) -> None:
    with pytest.raises((ValueError, KeyError)):
        decode_counts(line)


def test_start_line_that_is_not_a_start_is_refused() -> None:
    import base64
    import pickle

    with pytest.raises(ValueError):
        decode_start(base64.b64encode(pickle.dumps({"index": 1})) + b"\n")


def test_helper_counts_reach_totals_not_unsaved() -> None:
    progress = Progress()
    progress.add(Counts(received=5, processed=5))
    progress.add_helpers(Counts(received=7, processed=6, skipped=1))
    assert (progress.total.received, progress.total.processed) == (12, 11)
    assert progress.unsaved.received == 5  # the helper saves its own to the job row


def test_a_failed_save_gives_the_counts_back() -> None:
    progress = Progress()
    progress.add(Counts(received=5, processed=4, skipped=1, bytes=9))
    with pytest.raises(OSError), progress.saving() as taken:
        assert taken == Counts(received=5, processed=4, skipped=1, bytes=9)
        assert progress.unsaved.empty
        progress.add(Counts(received=2))  # counted meanwhile, by another repo
        raise OSError("connection lost")
    assert progress.unsaved == Counts(received=7, processed=4, skipped=1, bytes=9)
    with progress.saving() as taken:
        assert taken.received == 7
    assert progress.unsaved.empty


async def test_parent_link_over_real_pipes() -> None:
    """The helper side: the pressure bytes set `behind`, end of file sets `stop` (the
    parent is gone), and `report` sends what the totals gained, a last time at the end."""
    to_helper_r, to_helper_w = os.pipe()
    from_helper_r, from_helper_w = os.pipe()
    stdin = os.fdopen(to_helper_r, "rb")
    link = ParentLink(stdin, from_helper_w)
    stop = asyncio.Event()
    follow = asyncio.create_task(link.follow(stop))
    total = Counts()
    done = asyncio.Event()
    report = asyncio.create_task(link.report(total, done))
    try:
        os.write(to_helper_w, b"0001")
        for _ in range(200):
            if link.behind:
                break
            await asyncio.sleep(0.01)
        assert link.behind and live_behind(link.pressure())
        os.write(to_helper_w, b"0")
        for _ in range(200):
            if not link.behind:
                break
            await asyncio.sleep(0.01)
        assert not link.behind and not live_behind(link.pressure())
        total.add(Counts(received=3, processed=3, bytes=100))
        done.set()
        await asyncio.wait_for(report, 10)
        assert not stop.is_set()
        os.close(to_helper_w)  # the parent is gone
        await asyncio.wait_for(follow, 10)
        assert stop.is_set()
    finally:
        follow.cancel()
        report.cancel()
        os.close(from_helper_w)
    lines = os.read(from_helper_r, 65536).splitlines()
    os.close(from_helper_r)
    assert [decode_counts(x) for x in lines] == [Counts(received=3, processed=3, bytes=100)]


def test_helpers_rss_counts_the_running_helpers_only() -> None:
    """The memory line adds the helpers' RSS to the parent's: a running process counts, a
    pid that is gone counts nothing (a helper between two starts)."""
    import subprocess
    import sys

    from backfill.helpers import Helpers

    helpers = Helpers(lambda i: None, 2, behind=lambda: False, on_counts=lambda c: None)  # type: ignore[arg-type, return-value]
    assert helpers.rss_bytes() == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        helpers.pids[1] = child.pid
        assert helpers.rss_bytes() > 0
    finally:
        child.kill()
        child.wait()
    assert helpers.rss_bytes() == 0


def test_rss_is_read_at_most_every_refresh_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The throttle's RSS reading (asked before every batch and claim) is reused for
    RSS_REFRESH_S, then read again: 64 MiB more resident memory shows only then."""
    from backfill import throttle

    clock = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(throttle, "_rss_read", {})
    before = throttle.process_rss_bytes()
    held = b"x" * (64 * 1024 * 1024)  # written, so resident
    clock[0] += throttle.RSS_REFRESH_S / 2
    assert throttle.process_rss_bytes() == before
    clock[0] += throttle.RSS_REFRESH_S
    assert throttle.process_rss_bytes() >= before + 60 * 1024 * 1024
    del held


def test_a_helper_process_does_not_import_the_devnet() -> None:
    """`firehose backfill helper` builds the whole command line, the devnet's options
    included: that must not load the devnet's relay, keys and aiohttp server (~0.1 s of CPU
    and ~12 MB per helper; firehose/devnet/options.py). A fresh interpreter, so what other
    tests imported does not count."""
    script = (
        "import json, sys\n"
        "from firehose.cli import build_parser\n"
        "args = build_parser().parse_args(['backfill', 'helper'])\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('firehose.devnet')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(out.stdout))
    assert loaded <= {
        "firehose.devnet",
        "firehose.devnet.cli",
        "firehose.devnet.options",
        "firehose.devnet.httpfaults",
    }, sorted(loaded)
