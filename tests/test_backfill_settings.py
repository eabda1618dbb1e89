"""BackfillSettings: the guide's defaults, profiles, explicit overrides, loud bad values."""

from __future__ import annotations

import pytest

from backfill.settings import PROFILES, BackfillSettings
from firehose.settings import ConfigError, Settings


def test_guide_defaults() -> None:
    s = BackfillSettings.from_env({})
    assert (s.days, s.batch_size, s.batch_delay_ms, s.max_concurrent) == (0, 5, 2000, 2)
    assert (s.max_memory_mb, s.use_idle) == (512, True)
    assert (s.max_repo_mb, s.max_attempts, s.dids) == (512, 5, ())
    assert not (s.on_all_workers or s.vacuum or s.dry_run or s.allow_private_network)
    assert s.plc_url == "https://plc.directory"
    assert not s.enabled


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("conservative", (5, 2000, 2, 512, True)),
        ("moderate", (20, 500, 5, 1024, True)),
        ("aggressive", (100, 100, 10, 2048, True)),
        ("unthrottled", (5000, 0, 32, 2048, False)),
    ],
)
def test_profiles(profile: str, expected: tuple[object, ...]) -> None:
    s = BackfillSettings.from_env({"BACKFILL_PROFILE": profile.upper()})
    assert (s.batch_size, s.batch_delay_ms, s.max_concurrent, s.max_memory_mb, s.use_idle) == (
        expected
    )
    assert s.profile == profile
    assert set(PROFILES) == {"conservative", "moderate", "aggressive", "unthrottled"}


def test_explicit_variables_override_the_profile() -> None:
    s = BackfillSettings.from_env(
        {
            "BACKFILL_PROFILE": "aggressive",
            "BACKFILL_BATCH_SIZE": "7",
            "BACKFILL_USE_IDLE": "true",
            "BACKFILL_MAX_MEMORY_MB": "300",
        }
    )
    assert (s.batch_size, s.batch_delay_ms, s.max_concurrent, s.max_memory_mb) == (7, 100, 10, 300)


def test_values_parsed() -> None:
    s = BackfillSettings.from_env(
        {
            "BACKFILL_DAYS": "-1",
            "BACKFILL_DIDS": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa, did:web:example.com",
            "BACKFILL_ON_ALL_WORKERS": "yes",
            "BACKFILL_VACUUM": "1",
            "BACKFILL_DRY_RUN": "on",
            "PLC_URL": "http://127.0.0.1:2582/",
            "ALLOW_PRIVATE_NETWORK": "true",
            "BACKFILL_MAX_ATTEMPTS": "3",
            "BACKFILL_MAX_REPO_MB": "64",
        }
    )
    assert s.days == -1 and s.enabled
    assert s.dids == ("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:web:example.com")
    assert s.on_all_workers and s.vacuum and s.dry_run and s.allow_private_network
    assert s.plc_url == "http://127.0.0.1:2582"
    assert (s.max_attempts, s.max_repo_mb) == (3, 64)


def test_runs_on() -> None:
    on = BackfillSettings(days=30)
    assert on.runs_on(0) and not on.runs_on(1)
    assert BackfillSettings(days=30, on_all_workers=True).runs_on(3)
    assert not BackfillSettings(days=0).runs_on(0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKFILL_DAYS", "abc"),
        ("BACKFILL_DAYS", "-2"),
        ("BACKFILL_DAYS", "1.5"),
        ("BACKFILL_BATCH_SIZE", "0"),
        ("BACKFILL_BATCH_DELAY_MS", "-1"),
        ("BACKFILL_MAX_CONCURRENT", "many"),
        ("BACKFILL_MAX_MEMORY_MB", "1"),
        ("BACKFILL_USE_IDLE", "maybe"),
        ("BACKFILL_PROFILE", "turbo"),
        ("BACKFILL_MAX_ATTEMPTS", "0"),
        ("BACKFILL_MAX_REPO_MB", "x"),
        ("BACKFILL_DIDS", "alice.bsky.social"),
        ("BACKFILL_ON_ALL_WORKERS", "2"),
        ("BACKFILL_VACUUM", "y e s"),
        ("BACKFILL_DRY_RUN", "nope"),
        ("PLC_URL", "ftp://plc"),
        ("ALLOW_PRIVATE_NETWORK", "sure"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_settings_carries_backfill() -> None:
    s = Settings.from_env({"BACKFILL_DAYS": "30", "BACKFILL_PROFILE": "moderate"})
    assert s.backfill.days == 30 and s.backfill.batch_size == 20
    assert Settings.from_env({}).backfill == BackfillSettings()
