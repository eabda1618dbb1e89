"""Devnet accounts: identity, key, repo and the bookkeeping the generator draws from."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from firehose.devnet.keys import SigningKey
from firehose.devnet.plc import did_document as plc_did_document
from firehose.devnet.repo import Repo

STATUS_ACTIVE = "active"
STATUS_DELETED = "deleted"


class IndexedSet:
    """Insertion-ordered set with O(1) add/remove and seeded random choice."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        position = self.index.pop(item, None)
        if position is None:
            return
        last = self.items.pop()
        if position < len(self.items):
            self.items[position] = last
            self.index[last] = position

    def choice(self, rng: random.Random) -> str | None:
        return self.items[rng.randrange(len(self.items))] if self.items else None

    def __contains__(self, item: object) -> bool:
        return item in self.index

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Account:
    index: int
    key: SigningKey
    did: str
    handle: str
    pds_endpoint: str
    genesis_op: dict[str, Any]
    repo: Repo
    status: str = STATUS_ACTIVE
    live: IndexedSet = field(default_factory=IndexedSet)  # paths of current records
    deleted: IndexedSet = field(default_factory=IndexedSet)  # deleted, not re-created
    lists: list[str] = field(default_factory=list)  # uris of this account's lists
    handle_changes: int = 0
    model_kind: str | None = None  # history model accounts: dormant, casual, daily, heavy
    # History model: (path, rev of the deleting commit) of every record it deleted.
    model_deletes: list[tuple[str, str]] = field(default_factory=list, repr=False)
    # (rev, {uri: cid}, {uri: record time}) of the last truth computed for this repo: a
    # repo that did not change since (prebuilt repos never do) is not walked again.
    truth_cache: tuple[str | None, dict[str, str], dict[str, int | None]] | None = field(
        default=None, repr=False
    )

    def did_document(self) -> dict[str, Any]:
        return plc_did_document(self.did, self.handle, self.key, self.pds_endpoint)


def did_document(account: Account) -> dict[str, Any]:
    return account.did_document()
