"""Backfill configuration: `BackfillSettings.from_env(env)`, profiles, explicit overrides.

The user guide's variables and defaults (conservative profile) are honoured word for word:
BACKFILL_DAYS 0, BACKFILL_BATCH_SIZE 5, BACKFILL_BATCH_DELAY_MS 2000, BACKFILL_MAX_CONCURRENT
2, BACKFILL_MAX_MEMORY_MB 512, BACKFILL_USE_IDLE true. BACKFILL_PROFILE picks a whole set
(the guide's conservative / moderate / aggressive, plus unthrottled); any variable set
explicitly overrides its profile value. A bad value raises firehose.settings.ConfigError
naming the variable (design invariant 6).

Parsing helpers come from firehose.envparse, which firehose.settings shares: this module must
not import firehose.settings (which imports it to build `Settings.backfill`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from backfill.handle_rules import HandleSettings
from firehose.envparse import ConfigError, Env, boolean, choice, int_range
from firehose.protocol.syntax import is_did

DEFAULT_PLC_URL = "https://plc.directory"


@dataclass(frozen=True, slots=True)
class Profile:
    batch_size: int  # records per write batch
    batch_delay_ms: int  # pause between two batches of one repo
    max_concurrent: int  # repos in flight (download + write)
    max_memory_mb: int  # RSS above which the backfill pauses
    use_idle: bool  # yield while the live stream is behind
    processes: int = 1  # processes running the backfill (backfill/helpers.py); 0: auto


PROFILES: dict[str, Profile] = {
    # The guide's default: backfill must never hurt the live stream.
    "conservative": Profile(5, 2000, 2, 512, True),
    "moderate": Profile(20, 500, 5, 1024, True),
    "aggressive": Profile(100, 100, 10, 2048, True),
    # A dedicated backfill machine: no delay, big batches, a process per core; the memory
    # limit still holds (split between the processes).
    "unthrottled": Profile(5000, 0, 32, 2048, False, processes=0),
}
DEFAULT_PROFILE = "conservative"

# BACKFILL_PROCESSES: each process needs this much of BACKFILL_MAX_MEMORY_MB at least (an
# idle backfill process is ~80 MB resident), and `auto` takes at most this many.
MIN_PROCESS_MEMORY_MB = 128
AUTO_PROCESSES_MAX = 8
AUTO = "auto"


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    days: int = 0  # 0 off, N days, -1 the whole history
    profile: str = DEFAULT_PROFILE
    batch_size: int = 5
    batch_delay_ms: int = 2000
    max_concurrent: int = 2
    max_memory_mb: int = 512
    use_idle: bool = True
    # Processes that run this backfill: this one and `processes - 1` helpers, which split
    # max_concurrent and max_memory_mb with it (`process_share`; backfill/helpers.py).
    processes: int = 1
    max_repo_mb: int = 512  # a repo CAR larger than this fails (non-transient)
    max_attempts: int = 5  # transient failures of one repo before it is failed
    dids: tuple[str, ...] = ()  # priority repos, claimed before enumerated ones
    on_all_workers: bool = False  # let workers other than 0 help with the same job
    vacuum: bool = False  # VACUUM ANALYZE the touched tables on completion
    dry_run: bool = False  # fetch and count, write nothing
    # With a cutoff, ask getRepo only for what was written after it (`since`; issue 9,
    # docs/backfill-window.md). Off: every repo is downloaded whole.
    since: bool = True
    # Narrowing (issue 9, docs/backfill-narrowing.md): with a cutoff, do not queue a repo whose
    # listRepos rev (latest commit) is older than it; with WANTED_COLLECTIONS made only of
    # exact NSIDs, enumerate with listReposByCollection instead of listRepos.
    skip_dormant: bool = True
    by_collection: bool = True
    plc_url: str = DEFAULT_PLC_URL
    allow_private_network: bool = False  # let PDS/PLC URLs resolve to private addresses
    # host:port keys allowed although private (backfill/hosts.py). No environment variable:
    # only `firehose run --devnet` sets it, to its own loopback relay, PDS and PLC ports.
    allowed_private_hosts: tuple[str, ...] = ()
    # Resyncs of desynchronized repos (backfill/resync.py), on every worker.
    resync_max_concurrent: int = 2  # repos downloaded at once per worker
    resync_max_attempts: int = 5  # transient failures before a resync is failed
    # Handles of backfilled accounts, verified both ways (backfill/handles.py).
    handles: HandleSettings = field(default_factory=HandleSettings)

    @property
    def enabled(self) -> bool:
        return self.days != 0

    def runs_on(self, worker_id: int) -> bool:
        return self.enabled and (worker_id == 0 or self.on_all_workers)

    def process_share(self, index: int) -> BackfillSettings:
        """The limits process `index` of `processes` runs with (0: the one that starts the
        helpers): BACKFILL_MAX_CONCURRENT split as evenly as it goes, BACKFILL_MAX_MEMORY_MB
        in equal parts, so the totals stay what the user set. A helper (index > 0) starts
        no helper, queues no BACKFILL_DIDS (its parent did) and runs no final VACUUM."""
        n = self.processes
        if not 0 <= index < n:
            raise ValueError(f"process {index} of {n}")
        share = dataclasses.replace(
            self,
            max_concurrent=self.max_concurrent // n + (index < self.max_concurrent % n),
            max_memory_mb=self.max_memory_mb // n,
        )
        if index == 0:
            return share
        return dataclasses.replace(share, processes=1, dids=(), vacuum=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BackfillSettings:
        e = Env(env)
        profile_name = e.get("BACKFILL_PROFILE", DEFAULT_PROFILE, choice(tuple(PROFILES)))
        p = PROFILES[profile_name]
        settings = cls(
            days=e.get("BACKFILL_DAYS", 0, _days),
            profile=profile_name,
            batch_size=e.get("BACKFILL_BATCH_SIZE", p.batch_size, int_range(1, 100_000)),
            batch_delay_ms=e.get(
                "BACKFILL_BATCH_DELAY_MS", p.batch_delay_ms, int_range(0, 3_600_000)
            ),
            max_concurrent=e.get("BACKFILL_MAX_CONCURRENT", p.max_concurrent, int_range(1, 1024)),
            max_memory_mb=e.get(
                "BACKFILL_MAX_MEMORY_MB", p.max_memory_mb, int_range(64, 1_048_576)
            ),
            use_idle=e.get("BACKFILL_USE_IDLE", p.use_idle, boolean),
            max_repo_mb=e.get("BACKFILL_MAX_REPO_MB", 512, int_range(1, 65_536)),
            max_attempts=e.get("BACKFILL_MAX_ATTEMPTS", 5, int_range(1, 100)),
            dids=e.get("BACKFILL_DIDS", (), _dids),
            on_all_workers=e.get("BACKFILL_ON_ALL_WORKERS", False, boolean),
            vacuum=e.get("BACKFILL_VACUUM", False, boolean),
            dry_run=e.get("BACKFILL_DRY_RUN", False, boolean),
            since=e.get("BACKFILL_SINCE", True, boolean),
            skip_dormant=e.get("BACKFILL_SKIP_DORMANT", True, boolean),
            by_collection=e.get("BACKFILL_BY_COLLECTION", True, boolean),
            plc_url=e.get("PLC_URL", DEFAULT_PLC_URL, _http_url),
            allow_private_network=e.get("ALLOW_PRIVATE_NETWORK", False, boolean),
            resync_max_concurrent=e.get("RESYNC_MAX_CONCURRENT", 2, int_range(1, 64)),
            resync_max_attempts=e.get("RESYNC_MAX_ATTEMPTS", 5, int_range(1, 100)),
            handles=HandleSettings.from_env(env),
        )
        processes = e.get("BACKFILL_PROCESSES", p.processes or AUTO, _processes)
        return dataclasses.replace(settings, processes=_resolve_processes(processes, settings))


def _processes(raw: str) -> int | str:
    if raw.lower() == AUTO:
        return AUTO
    try:
        return int_range(1, 64)(raw)
    except ValueError:
        raise ValueError("expected auto or an integer between 1 and 64") from None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _resolve_processes(value: int | str, s: BackfillSettings) -> int:
    """`auto`: one per usable core, at most AUTO_PROCESSES_MAX, and no more than the repos
    in flight or the memory limit allow. A number: as given, if those allow it."""
    by_memory = s.max_memory_mb // MIN_PROCESS_MEMORY_MB
    if value == AUTO:
        return max(1, min(usable_cores(), AUTO_PROCESSES_MAX, s.max_concurrent, by_memory))
    assert isinstance(value, int)
    if value > s.max_concurrent:
        raise ConfigError(
            f"BACKFILL_PROCESSES={value} is more than BACKFILL_MAX_CONCURRENT="
            f"{s.max_concurrent}: each process needs at least one repo in flight"
        )
    if value > max(1, by_memory):
        raise ConfigError(
            f"BACKFILL_PROCESSES={value} leaves {s.max_memory_mb // value}MB of "
            f"BACKFILL_MAX_MEMORY_MB={s.max_memory_mb} to each process; each needs "
            f"{MIN_PROCESS_MEMORY_MB}MB"
        )
    return value


def _days(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("expected 0 (off), a number of days, or -1 (whole history)") from None
    if value < -1 or value > 36_500:
        raise ValueError("expected 0 (off), 1..36500 days, or -1 (whole history)")
    return value


def _dids(raw: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    for item in items:
        if not is_did(item):
            raise ValueError(f"{item!r} is not a DID")
    return items


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("expected an https:// URL")
    return raw.rstrip("/")
