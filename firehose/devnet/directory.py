"""Which repos exist, on which PDS host, in which order: the view listRepos, getRepo and the
PLC directory share.

Order is creation order and only ever grows at the end: pre-populated accounts, then the
served CAR files (`--extra-car`), then the did:web account, then the generator's accounts
as they sign up. That makes a position a stable, resumable listRepos cursor (lexicon
com.atproto.sync.listRepos: `cursor` is opaque to clients; ours is the position of the
last repo returned). Accounts are assigned to PDS hosts round-robin by their index.

`collection_page` is com.atproto.sync.listReposByCollection as indigo's collectiondir
serves it (cmd/collectiondir serve.go getDidsForCollection, pebble.go ReadCollection):
``{cursor?, repos: [{did}]}``, limit clamped to 1..10,000 (default 500, an unparsable
limit is the default), an opaque base64url cursor returned whenever a page is full (so the
last page may be empty), a bad NSID 400 ``BadRequest``, a bad cursor 500 ``DatabaseError``.
collectiondir orders by the time it first saw the (collection, did) pair; ours is creation
order, the same for repos that do not appear mid-listing. It lists every repo that holds at
least one record of the collection now (collectiondir may also keep a repo whose last
record of it was deleted: a consumer must expect empty repos).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from firehose.devnet import dagcbor
from firehose.devnet.accounts import STATUS_ACTIVE, STATUS_DELETED, Account
from firehose.devnet.carfile import CarRepo
from firehose.devnet.generator import Generator
from firehose.devnet.plc import PDS_SERVICE_ID, PDS_SERVICE_TYPE, did_document

LIST_REPOS_DEFAULT_LIMIT = 500  # lexicon default
LIST_REPOS_MAX_LIMIT = 1000  # lexicon maximum
BY_COLLECTION_DEFAULT_LIMIT = 500  # collectiondir getLimit(c, 1, 500, 10_000)
BY_COLLECTION_MAX_LIMIT = 10_000  # collectiondir clamps (the lexicon says 2000)


class CursorError(ValueError):
    """A listReposByCollection cursor this directory did not issue."""


@dataclass
class ServedRepo:
    did: str
    host: int  # PDS index
    account: Account | None = None  # generated or pre-populated
    car: CarRepo | None = None  # served verbatim from a file

    @property
    def status(self) -> str:
        return self.account.status if self.account is not None else STATUS_ACTIVE

    @property
    def handle(self) -> str:
        if self.account is not None:
            return self.account.handle
        assert self.car is not None
        return self.car.handle

    def holds(self, collection: str) -> bool:
        """At least one current record of `collection` (a deleted account holds none)."""
        if self.car is not None:
            return collection in self.car.collections
        assert self.account is not None
        return self.status != STATUS_DELETED and self.account.repo.collections[collection] > 0

    def head(self) -> tuple[bytes, str] | None:
        """(commit cid, rev), or None before the account's first commit."""
        if self.car is not None:
            return self.car.commit_cid, self.car.rev
        assert self.account is not None
        repo = self.account.repo
        if repo.commit_cid is None or repo.rev is None:
            return None
        return repo.commit_cid, repo.rev

    def list_entry(self) -> dict[str, Any] | None:
        """The listRepos `repo` object: {did, head, rev, active, status?}."""
        head = self.head()
        if head is None:
            return None
        entry: dict[str, Any] = {
            "did": self.did,
            "head": dagcbor.cid_str(head[0]),
            "rev": head[1],
            "active": self.status == STATUS_ACTIVE,
        }
        if self.status != STATUS_ACTIVE:
            entry["status"] = self.status
        return entry


class Directory:
    def __init__(self, generator: Generator, hosts: int) -> None:
        if hosts < 1:
            raise ValueError("need at least one PDS host")
        self.generator = generator
        self.hosts = hosts
        self.endpoints: list[str] = []  # filled once the PDS hosts listen
        self._repos: list[ServedRepo] = []
        self._by_did: dict[str, ServedRepo] = {}
        self._born = 0  # generator accounts already in _repos

    def add(self, repo: ServedRepo) -> None:
        if repo.did in self._by_did:
            raise ValueError(f"duplicate did {repo.did}")
        self._repos.append(repo)
        self._by_did[repo.did] = repo

    def add_account(self, account: Account) -> None:
        self.add(ServedRepo(account.did, account.index % self.hosts, account=account))

    def add_car(self, car: CarRepo, position: int) -> None:
        self.add(ServedRepo(car.did, position % self.hosts, car=car))

    def _sync(self) -> None:
        """Append accounts the generator signed up since the last look."""
        accounts = self.generator.accounts
        while self._born < len(accounts):
            self.add_account(accounts[self._born])
            self._born += 1

    def repos(self) -> list[ServedRepo]:
        self._sync()
        return self._repos

    def get(self, did: str) -> ServedRepo | None:
        self._sync()
        return self._by_did.get(did)

    def endpoint(self, repo: ServedRepo) -> str:
        return self.endpoints[repo.host]

    def list_page(self, cursor: str | None, limit: int, host: int | None = None) -> dict[str, Any]:
        """One listRepos page after `cursor`; `cursor` is omitted on the last page."""
        repos = self.repos()
        position = int(cursor) if cursor else 0
        page: list[dict[str, Any]] = []
        while position < len(repos) and len(page) < limit:
            repo = repos[position]
            position += 1
            entry = repo.list_entry() if host is None or repo.host == host else None
            if entry is not None:
                page.append(entry)
        body: dict[str, Any] = {"repos": page}
        if position < len(repos):
            body["cursor"] = str(position)
        return body

    def collection_page(self, collection: str, cursor: str | None, limit: int) -> dict[str, Any]:
        """One listReposByCollection page; raises CursorError for a cursor not ours."""
        repos = self.repos()
        position = decode_collection_cursor(cursor) if cursor else 0
        page: list[dict[str, str]] = []
        while position < len(repos) and len(page) < limit:
            repo = repos[position]
            position += 1
            if repo.head() is not None and repo.holds(collection):
                page.append({"did": repo.did})
        body: dict[str, Any] = {"repos": page}
        if len(page) >= limit:  # collectiondir: a full page always carries a cursor
            body["cursor"] = encode_collection_cursor(position)
        return body

    def did_document(self, did: str) -> dict[str, Any] | None:
        """The current DID document (handle and PDS endpoint as served now)."""
        repo = self.get(did)
        if repo is None:
            return None
        endpoint = self.endpoint(repo)
        if repo.account is not None:
            return did_document(did, repo.account.handle, repo.account.key, endpoint)
        return {  # a served CAR: its key is unknown, so no verification method
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": did,
            "alsoKnownAs": [f"at://{repo.handle}"],
            "verificationMethod": [],
            "service": [
                {"id": f"#{PDS_SERVICE_ID}", "type": PDS_SERVICE_TYPE, "serviceEndpoint": endpoint}
            ],
        }

    def hosts_truth(self) -> dict[str, str]:
        """did -> PDS endpoint, for the truth file."""
        return {repo.did: self.endpoint(repo) for repo in self.repos()}


def encode_collection_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_collection_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise CursorError(cursor) from None
    if not text.startswith("p") or not text[1:].isdigit():
        raise CursorError(cursor)
    return int(text[1:])
