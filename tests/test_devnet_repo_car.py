"""The devnet's getRepo body without `since` (firehose/devnet/repo.py `Repo.full_car`): cached
per rev, it is still exactly the reference's CAR of the current repo after every commit."""

from __future__ import annotations

from firehose.devnet import dagcbor
from firehose.devnet.keys import SigningKey
from firehose.devnet.repo import Repo, Write
from firehose.devnet.tid import tid
from firehose.protocol.car import read_car

POST = "app.bsky.feed.post"


def _sections(repo: Repo) -> bytes:
    """The CAR written section by section, as pds.py writes it with `since` or a fault."""
    assert repo.commit_cid is not None
    return dagcbor.write_car(repo.commit_cid, repo.blocks_since(None))


def test_the_cached_car_follows_every_commit() -> None:
    repo = Repo("did:plc:" + "a" * 24, SigningKey.from_seed(1, 0))
    seen = []
    for n in range(1, 4):
        rev = tid(1_700_000_000_000_000 + n, 0)
        writes = [
            Write("create", f"{POST}/{tid(1_600_000_000_000_000 + 10 * n + i, 1)}", {"text": "x"})
            for i in range(n)
        ]
        repo.commit(writes, rev)
        car = repo.full_car()
        assert car is repo.full_car()  # cached for this rev
        assert car == _sections(repo)
        parsed = read_car(car)
        assert parsed.root_cid == repo.commit_cid
        assert sum(1 for _ in parsed.blocks) == len(repo.car_blocks())
        seen.append(car)
    assert len(set(seen)) == 3
