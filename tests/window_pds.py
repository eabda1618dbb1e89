"""Test helper: repos with a history, served by a small aiohttp PDS the way the reference
PDS serves them (getRepo with and without ``since``, getRecord proofs), plus faults.

`HistoryRepo` wraps the devnet's `Repo` and remembers, for every block, the rev of the
commit that FIRST wrote it, as the reference PDS's block store does (actor-store
repo_block.repoRev, ON CONFLICT DO NOTHING): ``getRepo?since=`` answers the current blocks
whose first rev is greater than `since`, newest first (``ORDER BY repoRev DESC, cid DESC``),
under a header naming the current commit; nothing newer -> the header alone.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from firehose.devnet import dagcbor
from firehose.devnet.keys import SigningKey
from firehose.devnet.repo import ACTION_CREATE, ACTION_UPDATE, Repo, Write
from firehose.protocol.car import read_car
from firehose.protocol.syntax import make_tid

POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile/self"


def tid_at(when: datetime, clock: int = 0) -> str:
    return make_tid(int(when.timestamp() * 1_000_000), clock)


def post(text: str, when: datetime) -> dict[str, Any]:
    return {"$type": POST, "text": text, "createdAt": when.strftime("%Y-%m-%dT%H:%M:%S.000Z")}


def profile(name: str) -> dict[str, Any]:
    # No createdAt: the window keeps it whatever its age (no TID key, no date).
    return {"$type": "app.bsky.actor.profile", "displayName": name}


class HistoryRepo:
    """A repo built commit by commit, with each block's first rev."""

    def __init__(self, did: str, seed: int) -> None:
        self.did = did
        self.repo = Repo(did, SigningKey.from_seed(seed, 0))
        self.first_rev: dict[bytes, str] = {}
        self._clock = 0

    def commit(self, writes: list[Write], when: datetime) -> str:
        self._clock += 1
        rev = tid_at(when, self._clock % 1024)
        commit = self.repo.commit(writes, rev)
        for cid in read_car(commit.car).blocks:
            self.first_rev.setdefault(cid, rev)
        return rev

    def add_posts(self, times: Iterable[datetime], per_commit: int = 3) -> list[str]:
        """One post per time (rkey = its TID), `per_commit` to a commit; the paths."""
        paths: list[str] = []
        batch: list[Write] = []
        ordered = sorted(times)
        for i, when in enumerate(ordered):
            path = f"{POST}/{tid_at(when, 7)}"
            batch.append(Write(ACTION_CREATE, path, post(f"post {i} of {self.did}", when)))
            paths.append(path)
            if len(batch) == per_commit:
                self.commit(batch, when)
                batch = []
        if batch:
            self.commit(batch, ordered[-1])
        return paths

    def set_profile(self, name: str, when: datetime) -> None:
        action = ACTION_UPDATE if self.repo.record_cid(PROFILE) is not None else ACTION_CREATE
        self.commit([Write(action, PROFILE, profile(name))], when)

    @property
    def rev(self) -> str:
        assert self.repo.rev is not None
        return self.repo.rev

    def blocks_since(self, since: str | None) -> list[tuple[bytes, bytes]]:
        rows = [
            (self.first_rev[cid], dagcbor.cid_str(cid), cid, block)
            for cid, block in self.repo.car_blocks()
        ]
        rows.sort(reverse=True)
        return [(cid, b) for rev, _, cid, b in rows if since is None or rev > since]

    def car(self, since: str | None = None) -> bytes:
        assert self.repo.commit_cid is not None
        return dagcbor.write_car(self.repo.commit_cid, self.blocks_since(since))

    def record_car(self, path: str) -> bytes:
        """getRecord: commit, the MST path to `path` (proof of presence or absence), and the
        record block when it exists."""
        assert self.repo.commit_cid is not None and self.repo.commit_block is not None
        blocks = {self.repo.commit_cid: self.repo.commit_block}
        blocks.update(self.repo.mst.path_blocks(path))
        entry = self.repo.records.get(path)
        if entry is not None:
            blocks[entry[0]] = entry[1]
        return dagcbor.write_car(self.repo.commit_cid, blocks.items())

    def records(self) -> dict[str, str]:
        """path -> cid string of every current record."""
        return {p: dagcbor.cid_str(cid) for p, (cid, _) in self.repo.records.items()}


def history(
    did: str, seed: int, now: datetime, *, old: int, new: int, with_profile: bool = True
) -> HistoryRepo:
    """A year-like history: (optionally) a profile written 400 days ago, `old` posts
    40..300 days ago, `new` posts in the last 20 days."""
    rng = random.Random(seed)
    repo = HistoryRepo(did, seed)
    if with_profile:
        repo.set_profile(f"name of {did}", now - timedelta(days=400))
    repo.add_posts(now - timedelta(days=rng.uniform(40, 300)) for _ in range(old))
    if new:
        repo.add_posts(now - timedelta(days=rng.uniform(0.1, 20)) for _ in range(new))
    return repo


@dataclass
class Pds:
    """What the fake PDS serves and how it misbehaves, per DID.

    repo_mode: "since" (reference semantics), "ignore" (whole repo whatever `since`),
    "drop_new_record" (a since answer without the newest record block), "drop_commit"
    (a since answer without its commit block), "drop_block" (any answer without one
    record block). record_mode: "proof", "not_found" (XRPC RecordNotFound), "not_found_404",
    "bad_hash", "wrong_did", "swap_record", "server_error", "server_error_once" (502, then a proof).
    """

    repos: dict[str, HistoryRepo]
    repo_mode: dict[str, str] = field(default_factory=dict)
    record_mode: dict[str, str] = field(default_factory=dict)
    get_repo: list[tuple[str, str | None]] = field(default_factory=list)
    get_record: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        app.router.add_get("/xrpc/com.atproto.sync.getRecord", self._get_record)
        return app

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        did, since = request.query["did"], request.query.get("since")
        self.get_repo.append((did, since))
        repo = self.repos.get(did)
        if repo is None:
            return web.json_response({"error": "RepoNotFound", "message": did}, status=400)
        mode = self.repo_mode.get(did, "since")
        if mode == "ignore":
            since = None
        blocks = repo.blocks_since(since)
        if since is not None and mode == "drop_new_record":
            newest = max(p for p in repo.repo.records if p.startswith(POST))
            blocks = [(c, b) for c, b in blocks if c != repo.repo.records[newest][0]]
        if since is not None and mode == "drop_commit":
            blocks = [(c, b) for c, b in blocks if c != repo.repo.commit_cid]
        if mode == "drop_block":
            some = sorted(repo.repo.records)[0]
            blocks = [(c, b) for c, b in blocks if c != repo.repo.records[some][0]]
        assert repo.repo.commit_cid is not None
        body = dagcbor.write_car(repo.repo.commit_cid, blocks)
        return web.Response(body=body, content_type="application/vnd.ipld.car")

    async def _get_record(self, request: web.Request) -> web.StreamResponse:
        did = request.query["did"]
        path = f"{request.query['collection']}/{request.query['rkey']}"
        self.get_record[did] += 1
        repo = self.repos[did]
        mode = self.record_mode.get(did, "proof")
        exists = repo.repo.records.get(path) is not None
        if mode == "server_error_once" and self.get_record[did] == 1:
            return web.json_response({"error": "InternalServerError"}, status=502)
        if mode == "server_error":
            return web.Response(status=503)
        if mode == "not_found" and not exists:
            # Some PDS software (and the lexicon): an XRPC error instead of a proof of absence.
            return web.json_response({"error": "RecordNotFound", "message": path}, status=400)
        if mode == "not_found_404" and not exists:
            return web.json_response({"error": "RecordNotFound", "message": path}, status=404)
        body = repo.record_car(path)
        if mode == "bad_hash" and exists:
            cid, block = repo.repo.records[path]
            body = body.replace(block, block[:-1] + bytes([block[-1] ^ 1]))
        elif mode == "wrong_did":
            other = next(r for d, r in self.repos.items() if d != did)
            body = other.record_car(path)
        elif mode == "swap_record" and exists:
            cid, _block = repo.repo.records[path]
            fake_cid, fake_block = dagcbor.encode_block(profile("someone else"))
            sections = [(c, b) for c, b in read_car(body).blocks.items() if c != cid]
            assert repo.repo.commit_cid is not None
            body = dagcbor.write_car(repo.repo.commit_cid, [*sections, (fake_cid, fake_block)])
        return web.Response(body=body, content_type="application/vnd.ipld.car")
