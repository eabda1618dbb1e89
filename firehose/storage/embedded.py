"""Embedded PostgreSQL (pgserver) for machines without `DATABASE_URL`.

`start_embedded(DATA_DIR / "pg")` starts (or joins) a PostgreSQL 16 server whose data lives in
that directory, creates the database `atproto` if it is missing and returns its DSN. The same
data survives a restart.

pgserver notes that shape this module:
  * `cleanup_mode="stop"`: stop the server when the last handle goes away (never "delete",
    which would remove the data directory);
  * pgserver shares one running server per data directory between processes: it keeps a list
    of the pids using it and only the last one to leave stops it. A process killed with
    -9 stays on that list, which would keep the server running forever; `stop()` therefore
    forgets dead pids first;
  * when the server is already running (left over from a crash) pgserver simply reuses it;
  * as root it runs PostgreSQL as a dedicated `pgserver` user;
  * the import is lazy: pgserver is only loaded when no DATABASE_URL is given.

The embedded server runs at the priority of the worker that starts it, with the few settings
of `EMBEDDED_SETTINGS` (set at every start, in its own `postgresql.auto.conf`) and, where its
file system allows, its WAL written with direct I/O into 64 MB of WAL buffers (`DIRECT_IO`,
probed before every start, and `RESTART_SETTINGS`: taken by one restart of a new data
directory); everything else is PostgreSQL's default.
"""

from __future__ import annotations

import logging
import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("firehose.db")

DATABASE_NAME = "atproto"

# No lower CPU priority for the server. Until 2026-12-04 its processes ran 10 nice levels
# below the worker: with one Python thread feeding every transaction, backends preempting it
# drained the pipeline (+9 % records/s in session 7, docs/performance-log.md). Since the backfill
# runs in one process per core (backfill/helpers.py), that no longer shows: bench/backfill.py
# 1,000 x 500, nine pairs alternating (loads 0.41-0.44), gave 430,188 records/s summed at the
# worker's priority against 420,154 at nice 10 (1.024x, faster in six pairs); bench/live.py
# (three pairs) and a one-process backfill (two pairs) did not move. So the server is left at
# the worker's priority, as a server of one's own is.

# Server settings of the embedded server (ALTER SYSTEM; a server of one's own is never touched).
# wal_init_zero=off: PostgreSQL fills every new 16 MB WAL segment with zeros before it
# writes WAL into it, so each byte of WAL reaches the page cache twice, and the segment is
# created while the WAL write lock is held, which every committing backend waits behind. An
# embedded data directory is new in a user's first run and its segments are all created
# during that run (a backfill writes about 1.5 KB of WAL per record). Off, a new segment is
# only sized (its last byte written). bench/backfill.py (1,000 x 500), six pairs alternating,
# loads 0.41-0.44: faster in every pair, 305,024 against 284,368 records/s summed (1.07x);
# bench/live.py (200,000 events, about 1 KB of WAL per event) unchanged in three pairs. The
# cost: on a full disk the failure comes when WAL is written into the segment (a server
# restart) rather than when it is created (docs/operations.md#postgresql-settings).
# max_wal_size=4GB, as the compose file's `db`: at the default 1 GB a checkpoint starts after
# about 540 MB of WAL (max_wal_size / (1 + checkpoint_completion_target)), i.e. every
# ~350,000 backfill records, and every page changed after it is logged whole again. Six pairs
# alternating on top of wal_init_zero=off (loads 0.41-0.44, a slow afternoon): faster in every
# pair, 268,286 against 228,672 records/s summed; its server log shows no `checkpoint
# starting: wal` during the run any more. pg_wal may hold up to about 4 GB.
EMBEDDED_SETTINGS: dict[str, str] = {"wal_init_zero": "off", "max_wal_size": "4GB"}

# Settings that take a restart (postmaster context), set with ALTER SYSTEM like the others and
# taken by one restart of a new data directory (`_take_restart_settings`). A server already
# running (joined, or left from a crash) takes them at its next start.
#
# debug_io_direct=wal: WAL written with O_DIRECT (PostgreSQL 16's name; up to 15 it did this by
# itself with `wal_sync_method = open_datasync` at `wal_level = minimal`). The WAL is written
# once and read back only by a crash recovery, yet through the page cache every byte of it is
# copied into a page the kernel then keeps, at the expense of the tables' pages: a backfill
# writes ~1.5 KB of WAL per record. bench/backfill.py (1,000 x 500), five pairs alternating
# (2026-12-05, loads 0.36-0.43): 255,936 against 234,927 records/s summed (1.09x), PostgreSQL
# 16.1-16.8 against 17.4-21.9 µs of CPU per record; bench/live.py (two pairs) unchanged.
# PostgreSQL's documentation files the setting under developer options and warns that direct
# I/O of *data* files costs speed (no read-ahead, no write combining); only the WAL is written
# this way here. A file system without O_DIRECT would fail the server at its first WAL write,
# so the data directory is probed before every start (`direct_io_works`), and the setting
# left out (and dropped from a data directory moved there) where the probe fails.
#
# wal_buffers=64MB (default 1/32 of shared_buffers: 4 MB), with or without direct I/O: a
# transaction bigger than the WAL buffers (a big repo's batch of 5,000 records writes ~7 MB)
# makes its backend write the oldest WAL page itself, one at a time: 46,437-52,600 WAL writes
# for 500,000 records where batches of 500 need ~1,800. Direct I/O makes each such write wait
# for the disk. bench/backfill.py --repos 100 --records 5000 (one run each, loads 0.41-0.44):
# 28,978 records/s with direct I/O and 4 MB, 36,331 without either, 42,664 with 64 MB alone,
# 46,626 with both (1,016 WAL writes; PostgreSQL 16.8 against 20.2 µs per record without
# either); bench/pg_ceiling.py with 64 MB, direct I/O against none: copy/2 74,211 against
# 74,358, apply/2 68,331 against 55,793 records/s. The buffers are shared memory: 64 MB more.
DIRECT_IO = ("debug_io_direct", "wal")
RESTART_SETTINGS: dict[str, str] = {"wal_buffers": "64MB"}
_PROBE_BYTES = 8192  # one WAL page; an anonymous mmap is page-aligned, as O_DIRECT requires


class EmbeddedPostgres:
    """A running embedded server: `.dsn` points to the database `atproto`."""

    def __init__(self, server: Any, data_dir: Path, database: str) -> None:
        self._server = server
        self.data_dir = data_dir
        self.database = database
        self.admin_dsn: str = server.get_uri()
        self.dsn: str = server.get_uri(database)
        self._stopped = False

    def stop(self) -> None:
        """Leave the server; it stops when no other live process uses it. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _forget_dead_pids(self._server)
        try:
            self._server.cleanup()
        except Exception:  # a stop failure must not hide the error that made us stop
            log.exception("embedded PostgreSQL in %s did not stop cleanly", self.data_dir)


def _forget_dead_pids(server: Any) -> None:
    """Drop pids of processes that died without leaving (kill -9) from pgserver's list."""
    try:
        with server._lock:  # pgserver's own inter-process lock around that list
            handles = server.global_process_id_list
            alive = [p for p in handles.get() if p == os.getpid() or _pid_alive(p)]
            handles.put(alive)
    except Exception:  # best effort: pgserver internals
        log.debug("could not prune pgserver's pid list", exc_info=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _psql(server: Any, *sql: str, database: str = "postgres") -> str:
    """Run each of `sql` as its own command (its own transaction) in one psql."""
    from pgserver._commands import POSTGRES_BIN_PATH

    commands = [arg for statement in sql for arg in ("-c", statement)]
    out = subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "psql"),
            "-X",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
            *commands,
            server.get_uri(database),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"psql failed: {out.stderr.strip()}")
    return out.stdout.strip()


def start_embedded(data_dir: Path | str, *, database: str = DATABASE_NAME) -> EmbeddedPostgres:
    """Start (or join) the embedded server in `data_dir`; create `database` if missing.

    Blocking (initdb takes a few seconds the first time); call it before the event loop is
    busy or through `asyncio.to_thread`.
    """
    import pgserver  # lazy: only needed without DATABASE_URL

    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    direct = direct_io_works(_wal_dir(path))
    if not direct:
        _drop_direct_io(path)
    server = pgserver.get_server(path, cleanup_mode="stop")
    try:
        # `database` is our own constant (or a test's), not external input; psql needs it
        # inline because CREATE DATABASE takes no bind parameters. Quote it as an identifier.
        ident = '"' + database.replace('"', '""') + '"'
        literal = "'" + database.replace("'", "''") + "'"
        exists = _psql(server, f"SELECT 1 FROM pg_database WHERE datname = {literal}")
        if exists != "1":
            try:
                _psql(server, f"CREATE DATABASE {ident}")
                log.info("created database %s in embedded PostgreSQL %s", database, path)
            except RuntimeError as err:
                if "already exists" not in str(err):  # another process won the race
                    raise
        apply_settings(server)
        name, value = DIRECT_IO
        wanted = {**RESTART_SETTINGS, name: value} if direct else RESTART_SETTINGS
        server = _take_restart_settings(server, path, wanted)
    except BaseException:
        embedded = EmbeddedPostgres(server, path, database)
        embedded.stop()
        raise
    return EmbeddedPostgres(server, path, database)


def apply_settings(server: Any, settings: dict[str, str] = EMBEDDED_SETTINGS) -> None:
    """ALTER SYSTEM each of `settings` and reload the server's configuration. The names and
    values are this module's constants (ALTER SYSTEM takes no bind parameters); every one is
    reloadable, so a server already running (joined, or left from a crash) takes them too."""
    _psql(server, *_alter_system(settings), "SELECT pg_reload_conf()")


def _alter_system(settings: dict[str, str]) -> list[str]:
    """ALTER SYSTEM statements of `settings`: this module's constants, never external input
    (ALTER SYSTEM takes no bind parameters)."""
    return [f"ALTER SYSTEM SET {name} = '{value}'" for name, value in settings.items()]


def direct_io_works(directory: Path) -> bool:
    """Whether a file in `directory` (or, while it does not exist yet, its nearest existing
    parent) can be written with O_DIRECT: one aligned 8 KB page, as PostgreSQL writes WAL."""
    flag = getattr(os, "O_DIRECT", 0)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not flag:
        return False
    probe = directory / f".direct_io_probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o600)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, _PROBE_BYTES) as page:
            return os.write(fd, page) == _PROBE_BYTES
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _wal_dir(path: Path) -> Path:
    """Where the server writes its WAL (pg_wal may be a link to another file system)."""
    wal = path / "pg_wal"
    return wal.resolve() if wal.exists() else path


def _drop_direct_io(path: Path) -> None:
    """Remove DIRECT_IO from the data directory's postgresql.auto.conf (ALTER SYSTEM's file,
    which the server reads when it starts) where the file system does not allow it: the data
    directory was moved (or copied) from one that did."""
    auto = path / "postgresql.auto.conf"
    if not auto.exists():
        return
    lines = auto.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.lstrip().startswith(DIRECT_IO[0])]
    if kept != lines:
        log.warning("embedded PostgreSQL in %s: no direct I/O on this file system", path)
        auto.write_text("".join(kept))


def _take_restart_settings(server: Any, path: Path, settings: dict[str, str]) -> Any:
    """ALTER SYSTEM each of `settings` (names and values: this module's constants) that the
    server does not run with, and restart it to take them when no other process uses it (a
    new data directory: the first start; about half a second, once). Otherwise it takes them
    at its next start."""
    import pgserver

    shown = " || '|' || ".join(f"current_setting('{k}')" for k in settings)  # one psql
    running = _psql(server, f"SELECT {shown}").split("|")
    missing = {k: v for (k, v), now in zip(settings.items(), running, strict=True) if now != v}
    if not missing:
        return server
    _psql(server, *_alter_system(missing))
    with server._lock:  # pgserver's inter-process lock around its list of users
        alone = server.global_process_id_list.get() == [os.getpid()]
    if not alone:
        return server
    log.info("restarting embedded PostgreSQL in %s to take %s", path, ", ".join(missing))
    server.cleanup()  # stops it: we are its only user
    restarted = pgserver.get_server(path, cleanup_mode="stop")
    if restarted is server:  # another process joined in between: it was not stopped
        server.global_process_id_list.get_and_add(os.getpid())
    return restarted
