"""The compose file's PostgreSQL settings, started for real: a PostgreSQL 16 (pgserver's, the
version of the `postgres:16` image) runs with exactly the `-c` flags of the `db` service,
defaults interpolated as docker-compose does, so a misspelt name or a bad value fails here
(PostgreSQL refuses to start) instead of on an operator's host."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from firehose.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.python-default.yml"
# `${NAME:-default}` and `${NAME}` as the Compose Specification interpolates them.
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
# Settings that must not be overridable: the worker's exactly-once rule relies on them.
FIXED = {"synchronous_commit": "on"}
# Every tunable the issue asks for (a test that the list did not shrink).
TUNED = {
    "shared_buffers",
    "effective_cache_size",
    "maintenance_work_mem",
    "max_wal_size",
    "min_wal_size",
    "checkpoint_timeout",
    "checkpoint_completion_target",
    "wal_compression",
    "wal_buffers",
    "max_connections",
}
START_TIMEOUT_S = 120


def db_service() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    service: dict[str, Any] = data["services"]["db"]
    return service


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name, "")
        return got if got else (default or "")

    return _VAR.sub(sub, value)


def settings_of(command: list[str], env: Mapping[str, str]) -> dict[str, str]:
    """`postgres -c name=value ...` -> {name: value} after interpolation."""
    assert command[0] == "postgres", command
    args = command[1:]
    assert len(args) % 2 == 0 and all(a == "-c" for a in args[::2]), args
    out: dict[str, str] = {}
    for raw in args[1::2]:
        name, _, value = interpolate(str(raw), env).partition("=")
        assert value, f"no value for {name!r}"
        assert name not in out, f"{name} set twice"
        out[name] = value
    return out


def test_every_setting_is_overridable_with_a_default_except_the_fixed_ones() -> None:
    command = [str(a) for a in db_service()["command"]]
    settings = settings_of(command, {})
    assert set(settings) == TUNED | set(FIXED)
    for name, value in FIXED.items():
        assert settings[name] == value, name
    overridable = {
        m.group(1): raw.split("=", 1)[0] for raw in command[2::2] for m in _VAR.finditer(raw)
    }
    assert set(overridable.values()) == TUNED
    for var, name in overridable.items():
        assert var.startswith("PG_"), var
        overridden = settings_of(command, {var: "123"})
        assert overridden[name] == "123", (var, name)
    # /dev/shm of the container, overridable too.
    assert _VAR.fullmatch(str(db_service()["shm_size"]))


def test_max_connections_fits_the_workers_pools() -> None:
    settings = settings_of([str(a) for a in db_service()["command"]], {})
    pool = Settings.from_env({}).database.pool_size
    # 8 sharded workers at the default pool, plus the CLI/psql/monitoring and PostgreSQL's 3
    # superuser slots (docs/operations.md).
    assert int(settings["max_connections"]) >= 8 * pool + 5 + 3


@contextlib.contextmanager
def postgres_with(flags: dict[str, str]) -> Iterator[str]:
    """A fresh PostgreSQL 16 started by pg_ctl with `-c name=value` for each flag; yields a
    DSN. Not under pytest's basetemp: PostgreSQL runs as the `pgserver` user when we are root
    (see conftest.py) and a concurrent pytest run resets basetemp to mode 0700."""
    import pgserver
    from pgserver._commands import pg_ctl

    workdir = Path(tempfile.mkdtemp(prefix="firehose-pgconf-"))
    server = pgserver.get_server(workdir / "pg", cleanup_mode="stop")
    pgdata, user, log = server.pgdata, server.system_user, server.log
    socket_dir = server.get_postmaster_info().socket_dir
    dsn = server.get_uri()  # the same socket after the restart below
    started = False
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
        options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in flags.items())
        args = ["-w", "-t", str(START_TIMEOUT_S), "-o", '-h ""', "-o", f"-k {socket_dir}"]
        try:
            pg_ctl([*args, "-o", options, "-l", str(log), "start"], pgdata=pgdata, user=user)
        except Exception as err:
            tail = Path(log).read_text(errors="replace")[-3000:] if Path(log).exists() else ""
            pytest.fail(f"PostgreSQL refused the compose settings: {err}\n{tail}")
        started = True
        yield dsn
    finally:
        if started:
            with contextlib.suppress(Exception):
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
        with contextlib.suppress(Exception):
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


async def read_settings(dsn: str, names: list[str]) -> dict[str, tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, current_setting(name) AS value, source FROM pg_settings"
            " WHERE name = ANY($1::text[])",
            names,
        )
    finally:
        await conn.close()
    return {r["name"]: (r["value"], r["source"]) for r in rows}


def test_postgresql_starts_with_the_compose_settings() -> None:
    flags = settings_of([str(a) for a in db_service()["command"]], {})
    with postgres_with(flags) as dsn:
        got = asyncio.run(read_settings(dsn, list(flags)))
    assert set(got) == set(flags), set(flags) - set(got)
    for name, value in flags.items():
        shown, source = got[name]
        assert source == "command line", (name, source)
        # PostgreSQL shows `wal_compression=on` as the method it means.
        expected = {"wal_compression": {"on": "pglz"}}.get(name, {}).get(value, value)
        assert shown == expected, (name, value, shown)


def test_a_misspelt_setting_fails_to_start() -> None:
    """The check above can fail: PostgreSQL refuses an unknown name at start-up."""
    with (
        pytest.raises(pytest.fail.Exception, match="refused the compose settings"),
        postgres_with({"shared_bufers": "1GB"}),
    ):
        pass
