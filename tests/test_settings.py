"""Configuration errors are loud (design invariant 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from firehose.settings import ConfigError, Settings, collection_wanted

ROOT = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.relay.url == "wss://bsky.network"
    assert s.relay.start_cursor is None
    assert s.database.url is None
    assert s.pipeline.cursor_save_every == 1000
    assert s.pipeline.batch_max_events <= 1000
    assert s.worker.cursor_service == "firehose"
    assert s.log_format == "text"


def test_values_parsed() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:p@db:5432/atproto",
            "RELAY_URL": "ws://127.0.0.1:2470",
            "START_CURSOR": "42",
            "CURSOR_SAVE_EVERY": "500",
            "WANTED_COLLECTIONS": "app.bsky.feed.post, app.bsky.graph.*",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
            "WORKER_ID": "2",
            "WORKER_COUNT": "3",
        }
    )
    assert s.relay.start_cursor == 42
    assert s.pipeline.cursor_save_every == 500
    assert s.pipeline.batch_max_events <= 500
    assert s.pipeline.wanted_collections == ("app.bsky.feed.post", "app.bsky.graph.*")
    assert s.log_level == "DEBUG" and s.log_format == "json"
    assert s.worker.cursor_service == "firehose:2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CURSOR_SAVE_EVERY", "abc"),
        ("CURSOR_SAVE_EVERY", "0"),
        ("START_CURSOR", "-5"),
        ("RELAY_URL", "http://bsky.network"),
        ("RELAY_URL", "ws://relay.example.com"),  # plain ws only on loopback
        ("DATABASE_URL", "mysql://x"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("METRICS_PORT", "70000"),
        ("DB_POOL_SIZE", "1"),
        ("WANTED_COLLECTIONS", "not an nsid"),
        ("WORKER_ID", "x"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_worker_id_must_be_below_worker_count() -> None:
    with pytest.raises(ConfigError, match="WORKER_ID"):
        Settings.from_env({"WORKER_ID": "3", "WORKER_COUNT": "3"})


def test_collection_wanted() -> None:
    wanted = ("app.bsky.feed.post", "app.bsky.graph.*")
    assert collection_wanted("app.bsky.feed.post", wanted)
    assert collection_wanted("app.bsky.graph.follow", wanted)
    assert not collection_wanted("app.bsky.feed.like", wanted)
    assert collection_wanted("com.example.anything", ())


def test_bad_env_exits_nonzero_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "CURSOR_SAVE_EVERY": "lots", "DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "firehose"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "CURSOR_SAVE_EVERY" in proc.stderr
