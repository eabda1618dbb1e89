"""Configuration: one `Settings.from_env()` builds frozen, typed config.

Design invariant 6: a bad value stops start-up with a message naming the variable; it never
silently becomes a default. Each component receives only its own sub-config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from backfill.settings import BackfillSettings
from firehose.envparse import ConfigError, Env, boolean, choice, int_range
from firehose.model import SEQ_MAX

__all__ = ["ConfigError", "Settings", "collection_wanted"]

DEFAULT_RELAY_URL = "wss://bsky.network"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    # None: start the embedded PostgreSQL in data_dir. Kept out of repr: it holds the password.
    url: str | None = field(repr=False)
    data_dir: Path
    pool_size: int


@dataclass(frozen=True, slots=True)
class RelaySettings:
    url: str
    # None: resume the saved cursor, or the live tip when there is none.
    start_cursor: int | None
    # A socket that delivers nothing for this long is dead (no heartbeat in the protocol).
    idle_timeout_s: float = 60.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    # A connection that stayed up this long resets the backoff.
    healthy_after_s: float = 30.0
    max_frame_bytes: int = 5 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    cursor_save_every: int
    batch_max_events: int
    batch_max_wait_ms: int
    queue_max_frames: int
    wanted_collections: tuple[str, ...]  # empty: every collection


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: int
    worker_count: int

    @property
    def cursor_service(self) -> str:
        """Worker 0 of 1 owns the guide's `firehose` row; shards get their own row."""
        if self.worker_count == 1:
            return "firehose"
        return f"firehose:{self.worker_id}"


@dataclass(frozen=True, slots=True)
class Settings:
    database: DatabaseSettings
    relay: RelaySettings
    pipeline: PipelineSettings
    worker: WorkerSettings
    log_level: str
    log_format: str
    metrics_port: int
    extra: Mapping[str, str] = field(default_factory=dict)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    # Bearer token of the HTTP admin endpoints; None turns them off. Never in repr/logs.
    admin_token: str | None = field(default=None, repr=False)
    # Check every commit's signature against its repo's DID document (firehose.live.verify).
    # Off by default: the relay already verifies under sync 1.1 (docs/chain.md, Verified commits).
    verify_signatures: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = Env(os.environ if env is None else env)
        worker_count = e.get("WORKER_COUNT", 1, int_range(1, 1024))
        worker_id = e.get("WORKER_ID", 0, int_range(0, 1023))
        if worker_id >= worker_count:
            raise ConfigError(
                f"WORKER_ID={worker_id} must be smaller than WORKER_COUNT={worker_count}"
            )
        cursor_save_every = e.get("CURSOR_SAVE_EVERY", 1000, int_range(1, 1_000_000))
        return cls(
            database=DatabaseSettings(
                url=e.get("DATABASE_URL", None, _database_url),
                data_dir=e.get("DATA_DIR", Path("./data"), Path),
                pool_size=e.get("DB_POOL_SIZE", 4, int_range(2, 100)),
            ),
            relay=RelaySettings(
                url=e.get("RELAY_URL", DEFAULT_RELAY_URL, _relay_url),
                start_cursor=e.get("START_CURSOR", None, int_range(0, SEQ_MAX)),
                idle_timeout_s=e.get("RELAY_IDLE_TIMEOUT_S", 60.0, _seconds(1.0, 3600.0)),
            ),
            pipeline=PipelineSettings(
                cursor_save_every=cursor_save_every,
                # A batch never covers more events than the cursor may lag behind.
                batch_max_events=min(
                    cursor_save_every,
                    e.get("BATCH_MAX_EVENTS", 1000, int_range(1, 100_000)),
                ),
                batch_max_wait_ms=e.get("BATCH_MAX_WAIT_MS", 200, int_range(1, 60_000)),
                queue_max_frames=e.get("QUEUE_MAX_FRAMES", 5000, int_range(10, 1_000_000)),
                wanted_collections=e.get("WANTED_COLLECTIONS", (), _collections),
            ),
            worker=WorkerSettings(worker_id=worker_id, worker_count=worker_count),
            log_level=e.get("LOG_LEVEL", "INFO", choice(LOG_LEVELS, upper=True)),
            log_format=e.get("LOG_FORMAT", "text", choice(LOG_FORMATS)),
            metrics_port=e.get("METRICS_PORT", 8000, int_range(0, 65535)),
            backfill=BackfillSettings.from_env(os.environ if env is None else env),
            admin_token=e.get("ADMIN_TOKEN", None, str),
            verify_signatures=e.get("VERIFY_SIGNATURES", False, boolean),
        )


def _relay_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise ValueError("expected a wss:// URL")
    # Plain ws:// is only for loopback (the devnet, tests): the real relay speaks TLS.
    if parts.scheme == "ws" and parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError("ws:// is only accepted for loopback hosts; use wss://")
    return raw.rstrip("/")


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not lo <= value <= hi:  # also refuses nan and inf
            raise ValueError(f"expected seconds between {lo:g} and {hi:g}")
        return value

    return parse


def _database_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("postgres", "postgresql"):
        raise ValueError("expected postgresql://user:password@host:port/database")
    return raw


def _collections(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        stem = item[:-2] if item.endswith(".*") else item
        segments = stem.split(".")
        if len(segments) < 2 or not all(s and s.replace("-", "").isalnum() for s in segments):
            raise ValueError(f"{item!r} is not an NSID or an NSID prefix ending in .*")
    return items


def collection_wanted(collection: str, wanted: tuple[str, ...]) -> bool:
    """`WANTED_COLLECTIONS` matching: exact NSIDs or `prefix.*`."""
    if not wanted:
        return True
    for item in wanted:
        if item.endswith(".*"):
            if collection.startswith(item[:-1]):
                return True
        elif collection == item:
            return True
    return False
