"""Window downloads (getRepo?since=) and profile fetches (getRecord) over real HTTP, against
a small PDS serving repos with a history the way the reference PDS does
(tests/window_pds.py), and a real PostgreSQL for what ends up in the tables."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from backfill_http import host_client, serve
from prometheus_client import CollectorRegistry
from window_pds import POST, PROFILE, HistoryRepo, Pds, history, tid_at

from backfill.download import RepoSnapshot, fetch_repo
from backfill.hosts import FetchError, HostClient
from backfill.record_fetch import ABSENT, fetch_record, verify_record_car
from backfill.service import BackfillService
from backfill.settings import BackfillSettings
from backfill.since import (
    FALLBACK_EMPTY_NEWER,
    FALLBACK_NO_COMMIT,
    FALLBACK_RECORD,
    KIND_SINCE_EMPTY,
    KIND_SINCE_PARTIAL,
    KIND_SINCE_WHOLE,
    KIND_WHOLE,
)
from backfill.window import Window
from backfill.window_fetch import (
    PROFILE_ABSENT,
    PROFILE_ERROR,
    PROFILE_FOUND,
    PROFILE_TRIES,
    fetch_window,
)
from firehose.devnet import dagcbor
from firehose.model import Action, RecordWrite
from firehose.protocol.car import read_car
from firehose.storage.snapshots import write_snapshot

# A fixed moment: the trees (and so which holes a partial answer has) depend on the TIDs.
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAYS = 30
WINDOW = Window(NOW - timedelta(days=DAYS))
SINCE = WINDOW.since
assert SINCE is not None


def did(i: int) -> str:
    return f"did:plc:{i:024d}"


@asynccontextmanager
async def pds_for(pds: Pds) -> AsyncIterator[tuple[str, HostClient]]:
    async with serve(pds.app()) as base, host_client() as http:
        yield base, http


async def window_fetch(
    http: HostClient, base: str, d: str, tmp: Path, *, since: str | None = SINCE, **kw: Any
) -> RepoSnapshot:
    return await fetch_window(
        http, base, d, since=since, want_profile=kw.pop("want_profile", True),
        max_bytes=16 << 20, spool_dir=tmp, **kw,
    )  # fmt: skip


def rows(snap: RepoSnapshot, window: Window = WINDOW) -> dict[str, str]:
    """path -> cid of the writes `snap` yields under `window`."""
    with snap:
        return {
            f"{w.collection}/{w.rkey}": str(w.cid)
            for w in snap.writes(window)
            if isinstance(w, RecordWrite)
        }


def in_window(repo: HistoryRepo) -> dict[str, str]:
    """What a whole download keeps under WINDOW: TID keys at/after the cutoff, the profile."""
    return {
        p: c
        for p, c in repo.records().items()
        if p == PROFILE or WINDOW.rkey_verdict(p.split("/")[1]) is not False
    }


@pytest.mark.parametrize("memory_max_bytes", [None, 1])  # in memory, and spilled to disk
async def test_partial_tree_writes_only_what_is_present(
    tmp_path: Path, memory_max_bytes: int | None
) -> None:
    repo = history(did(1), 1, NOW, old=60, new=12)
    pds = Pds({repo.did: repo})
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path, memory_max_bytes=memory_max_bytes)
        whole = await fetch_repo(http, base, repo.did, max_bytes=16 << 20, spool_dir=tmp_path)
    assert snap.kind == KIND_SINCE_PARTIAL and snap.since_fallback is None
    assert snap.absent_subtrees > 0 and snap.absent_records > 0  # both kinds of hole
    assert (snap.rev, snap.head) == (repo.rev, (repo.did, repo.rev, snap.data_cid))
    # The profile was written 400 days ago: not in the answer, fetched with getRecord.
    assert snap.profile_fetch == PROFILE_FOUND and pds.get_record[repo.did] == 1
    assert pds.get_repo == [(repo.did, SINCE), (repo.did, None)]
    since_bytes = len(repo.car(SINCE)) + len(repo.record_car(PROFILE))
    assert snap.bytes_downloaded == since_bytes < whole.bytes_downloaded / 2
    got = rows(snap)
    assert got == in_window(repo) == rows(whole)
    assert len([p for p in got if p.startswith(POST)]) == 12


async def test_nothing_in_the_window_is_done_with_the_profile(tmp_path: Path) -> None:
    repo = history(did(2), 2, NOW, old=30, new=0)
    pds = Pds({repo.did: repo})
    assert repo.blocks_since(SINCE) == []  # the reference answers the header alone
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert snap.kind == KIND_SINCE_EMPTY and snap.head is None and snap.rev == ""
    assert snap.profile_fetch == PROFILE_FOUND
    with snap:
        (profile_write,) = list(snap.writes(WINDOW))
    assert isinstance(profile_write, RecordWrite) and profile_write.rev == repo.rev
    assert (profile_write.collection, profile_write.rkey) == tuple(PROFILE.split("/"))
    assert profile_write.cid == repo.records()[PROFILE]


async def test_pds_ignoring_since_gives_the_same_rows(tmp_path: Path) -> None:
    repo = history(did(3), 3, NOW, old=40, new=8)
    pds = Pds({repo.did: repo}, repo_mode={repo.did: "ignore"})
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert snap.kind == KIND_SINCE_WHOLE and snap.profile_fetch is None
    assert not pds.get_record  # a whole tree settles the profile
    assert rows(snap) == in_window(repo)


async def test_no_profile_is_fine_both_ways(tmp_path: Path) -> None:
    """RecordNotFound (the lexicon's error, some PDS software) and a proof of absence (the
    reference PDS)."""
    a = history(did(4), 4, NOW, old=20, new=3, with_profile=False)
    b = history(did(5), 5, NOW, old=20, new=3, with_profile=False)
    pds = Pds({a.did: a, b.did: b}, record_mode={a.did: "not_found", b.did: "proof"})
    async with pds_for(pds) as (base, http):
        for repo in (a, b):
            snap = await window_fetch(http, base, repo.did, tmp_path)
            if snap.profile_fetch is None:
                # The partial tree itself proved the absence (its path was all new).
                assert snap.kind == KIND_SINCE_PARTIAL
            else:
                assert snap.profile_fetch == PROFILE_ABSENT
            assert rows(snap) == in_window(repo)
            assert PROFILE not in in_window(repo)
        got_a = await fetch_record(http, base, a.did, "app.bsky.actor.profile", "self")
        got_b = await fetch_record(http, base, b.did, "app.bsky.actor.profile", "self")
    assert (got_a.outcome, got_a.proof) == (ABSENT, None)
    assert got_b.outcome == ABSENT and got_b.proof is not None and got_b.rev == b.rev


@pytest.mark.parametrize(
    ("mode", "detail"),
    [
        ("bad_hash", "does not match its CID"),
        ("wrong_did", "commit is for"),
        ("swap_record", "is not in the CAR"),
    ],
)
async def test_tampered_record_proofs_are_refused(tmp_path: Path, mode: str, detail: str) -> None:
    repo = history(did(6), 6, NOW, old=30, new=4)
    other = history(did(7), 7, NOW, old=5, new=1)
    pds = Pds({repo.did: repo, other.did: other}, record_mode={repo.did: mode})
    async with pds_for(pds) as (base, http):
        with pytest.raises(FetchError) as info:
            await fetch_record(http, base, repo.did, "app.bsky.actor.profile", "self")
        assert (info.value.reason, info.value.transient) == ("bad_response", False)
        assert detail in str(info.value)
        # In a window download: counted, logged, the profile not written, the rest is.
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert snap.profile_fetch == PROFILE_ERROR and not snap.extra
    assert rows(snap) == {p: c for p, c in in_window(repo).items() if p != PROFILE}


async def test_record_proof_verified_like_any_car(tmp_path: Path) -> None:
    repo = history(did(8), 8, NOW, old=10, new=2)
    path = sorted(p for p in repo.records() if p.startswith(POST))[-1]
    collection, rkey = path.split("/")
    proof = verify_record_car(repo.record_car(path), repo.did, collection, rkey)
    assert proof.write is not None and proof.rev == repo.rev
    assert (proof.write.cid, proof.write.action) == (repo.records()[path], Action.CREATE)
    # A path that stops early proves nothing: refused, not read as "absent".
    car = repo.record_car(path)
    parsed = read_car(car)
    root = parsed.root_cid
    commit_only = dagcbor.write_car(root, [(root, parsed.blocks[root])])
    with pytest.raises(FetchError, match="incomplete"):
        verify_record_car(commit_only, repo.did, collection, rkey)
    with pytest.raises(FetchError) as info:
        verify_record_car(car[: len(car) - 3], repo.did, collection, rkey)
    assert (info.value.reason, info.value.transient) == ("truncated", True)


async def test_profile_fetch_failure_that_may_pass_retries_the_repo(tmp_path: Path) -> None:
    repo = history(did(9), 9, NOW, old=30, new=3)
    pds = Pds({repo.did: repo}, record_mode={repo.did: "server_error"})
    async with pds_for(pds) as (base, http):
        with pytest.raises(FetchError) as info:
            await window_fetch(http, base, repo.did, tmp_path)
    assert info.value.transient and info.value.reason == "server_error"
    assert os.listdir(tmp_path) == []  # the spool is gone
    assert pds.get_record[repo.did] == PROFILE_TRIES  # retried in place first
    assert len(pds.get_repo) == 1


async def test_a_profile_fetch_failing_once_is_retried_in_place(tmp_path: Path) -> None:
    repo = history(did(14), 14, NOW, old=30, new=3)
    pds = Pds({repo.did: repo}, record_mode={repo.did: "server_error_once"})
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert snap.profile_fetch == PROFILE_FOUND and pds.get_record[repo.did] == 2
    assert pds.get_repo == [(repo.did, SINCE)]  # the repo itself is not downloaded again
    assert PROFILE in rows(snap)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("drop_new_record", FALLBACK_RECORD), ("drop_commit", FALLBACK_NO_COMMIT)],
)
async def test_suspect_since_answer_is_downloaded_whole(
    tmp_path: Path, mode: str, reason: str
) -> None:
    repo = history(did(10), 10, NOW, old=40, new=6)
    pds = Pds({repo.did: repo}, repo_mode={repo.did: mode})
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert (snap.kind, snap.since_fallback) == (KIND_WHOLE, reason)
    assert pds.get_repo == [(repo.did, SINCE), (repo.did, None)]
    assert snap.bytes_downloaded > len(repo.car())  # both downloads are counted
    assert rows(snap) == in_window(repo)


async def test_empty_answer_contradicted_by_the_commit_is_downloaded_whole(
    tmp_path: Path,
) -> None:
    """A since answer with no block, while getRecord shows a commit newer than since."""
    repo = history(did(11), 11, NOW, old=20, new=4)
    pds = Pds({repo.did: repo})
    real = repo.blocks_since
    repo.blocks_since = lambda since: [] if since is not None else real(None)  # type: ignore[method-assign]
    async with pds_for(pds) as (base, http):
        snap = await window_fetch(http, base, repo.did, tmp_path)
    assert (snap.kind, snap.since_fallback) == (KIND_WHOLE, FALLBACK_EMPTY_NEWER)
    assert rows(snap) == in_window(repo)


async def test_request_without_since_lacking_a_block_is_truncated(tmp_path: Path) -> None:
    repo = history(did(12), 12, NOW, old=10, new=2)
    pds = Pds({repo.did: repo}, repo_mode={repo.did: "drop_block"})
    async with pds_for(pds) as (base, http):
        with pytest.raises(FetchError) as info:
            await window_fetch(http, base, repo.did, tmp_path, since=None)
    assert (info.value.reason, info.value.transient) == ("truncated", True)
    assert pds.get_repo == [(repo.did, None)]


async def test_fetched_profile_converges_with_live_writes(conn: asyncpg.Connection) -> None:
    """The profile goes through the rev guard: a newer live profile is never overwritten,
    and an older live one is replaced, in either order."""
    repo = history(did(13), 13, NOW, old=5, new=1)
    proof = verify_record_car(repo.record_car(PROFILE), repo.did, "app.bsky.actor.profile", "self")
    fetched = proof.write
    assert fetched is not None
    newer = RecordWrite(
        repo.did, "app.bsky.actor.profile", "self", tid_at(NOW + timedelta(seconds=5)),
        Action.UPDATE, "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        {"$type": "app.bsky.actor.profile", "displayName": "live"}, False,
    )  # fmt: skip
    older = RecordWrite(
        repo.did, "app.bsky.actor.profile", "self", tid_at(NOW - timedelta(days=500)),
        Action.UPDATE, "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        {"$type": "app.bsky.actor.profile", "displayName": "stale"}, False,
    )  # fmt: skip
    uri = f"at://{repo.did}/{PROFILE}"

    async def stored() -> tuple[str, str]:
        row = await conn.fetchrow("SELECT cid, rev FROM records WHERE uri = $1", uri)
        assert row is not None
        return row["cid"], row["rev"]

    for first, second in ((newer, fetched), (fetched, newer)):
        await conn.execute("DELETE FROM records")
        await write_snapshot(conn, [first])
        await write_snapshot(conn, [second])
        assert await stored() == (newer.cid, newer.rev)
    for first, second in ((older, fetched), (fetched, older)):
        await conn.execute("DELETE FROM records")
        await write_snapshot(conn, [first])
        await write_snapshot(conn, [second])
        assert await stored() == (fetched.cid, fetched.rev)


# --- the whole backfill: the service, a real PostgreSQL, the PDS over HTTP ------------------


@dataclass
class Entry:
    did: str
    active: bool = True
    rev: str | None = None


@dataclass
class Page:
    repos: list[Entry]
    cursor: str | None
    invalid: int = 0


class PdsNetwork:
    """The `Network` of the service: listRepos from a list, everything else over HTTP to
    the fake PDS through the real window download."""

    def __init__(self, http: HostClient, base: str, dids: list[str], spool: Path) -> None:
        self.http, self.base, self.dids, self.spool = http, base, dids, spool
        self.rate_limit_pauses = 0

    async def list_repos(self, cursor: str | None, limit: int) -> Page:
        return Page([Entry(d) for d in self.dids], None)

    async def list_repos_by_collection(
        self, collection: str, cursor: str | None, limit: int
    ) -> Page:
        return await self.list_repos(cursor, limit)

    async def fetch(self, d: str, *, since: str | None = None, want_profile: bool = False) -> Any:
        return await fetch_window(
            self.http, self.base, d, since=since, want_profile=want_profile,
            max_bytes=16 << 20, spool_dir=self.spool,
        )  # fmt: skip

    def paused_hosts(self) -> dict[str, float]:
        return {}

    def known_hosts(self) -> set[str]:
        return {"pds:1"}


@pytest.mark.parametrize("since_on", [True, False])
async def test_service_backfills_the_window(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path, since_on: bool
) -> None:
    now = datetime.now(UTC)  # the service fixes its cutoff from the real clock
    repos = [
        history(did(20), 20, now, old=50, new=10),  # partial
        history(did(21), 21, now, old=30, new=0),  # nothing in the window
        history(did(22), 22, now, old=30, new=5),  # its PDS ignores since
        history(did(23), 23, now, old=30, new=5, with_profile=False),  # no profile
    ]
    pds = Pds({r.did: r for r in repos}, repo_mode={did(22): "ignore"},
              record_mode={did(23): "not_found"})  # fmt: skip
    settings = BackfillSettings(
        days=DAYS, batch_size=7, batch_delay_ms=0, max_concurrent=2, use_idle=False,
        since=since_on,
    )  # fmt: skip
    registry = CollectorRegistry()
    async with pds_for(pds) as (base, http):
        net = PdsNetwork(http, base, [r.did for r in repos], tmp_path)
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
        try:
            service = BackfillService(
                settings, pool, registry, relay_url="ws://127.0.0.1:1", worker_id=0,
                live_pressure=None, network=net,
            )  # fmt: skip
            await asyncio.wait_for(service.run(asyncio.Event()), 60)
        finally:
            await pool.close()
    job = await conn.fetchrow("SELECT * FROM backfill_jobs")
    assert job["status"] == "completed" and job["repos_done"] == 4
    # The job's cutoff is a few ms after ours: the same records either way.
    want = {
        f"at://{r.did}/{p}": c
        for r in repos
        for p, c in r.records().items()
        if p == PROFILE or Window(job["cutoff"]).rkey_verdict(p.split("/")[1]) is not False
    }
    got = {r["uri"]: r["cid"] for r in await conn.fetch("SELECT uri, cid FROM records")}
    assert got == want
    done = {r["did"]: r for r in await conn.fetch("SELECT did, rev, records FROM backfill_repos")}
    heads = {r["did"]: r["rev"] for r in await conn.fetch("SELECT did, rev FROM actors")}

    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    downloads = "backfill_window_downloads_total"
    if since_on:
        assert [q for q in pds.get_repo if q[1] is None] == []
        assert {d: s for d, s in pds.get_repo} == {r.did: job_since(job) for r in repos}
        assert sample(downloads, kind="since_partial") == 2
        assert sample(downloads, kind="since_empty") == 1
        assert sample(downloads, kind="since_whole_answer") == 1
        assert sample("backfill_profile_fetches_total", result="found") == 2
        assert sample("backfill_profile_fetches_total", result="absent") >= 0
        # Nothing in the window: done, the profile written, no head with a made-up rev.
        assert done[did(21)]["rev"] is None and done[did(21)]["records"] == 1
        assert heads.get(did(21)) in (None, repos[1].rev)
    else:
        assert all(s is None for _, s in pds.get_repo) and not pds.get_record
        assert sample(downloads, kind="whole") == 4
    assert heads[did(20)] == repos[0].rev and done[did(20)]["rev"] == repos[0].rev
    assert sample("backfill_bytes_downloaded_total") == job["bytes_downloaded"]


def job_since(job: Any) -> str | None:
    return Window(job["cutoff"]).since
