"""The deterministic event generator: accounts, their repos and the subscribeRepos event log.

`Generator(seed, accounts, start_time_us)` produces one encoded frame per `next_frame()`
call, with seq = 1, 2, 3, ... Everything (keys, DIDs, records, timestamps, revs) derives from
`seed` through one `random.Random`, and no set or hash order is ever iterated, so the same
parameters give byte-identical frames on every run and machine. Time is simulated: each event
advances a virtual clock by a random gap, so revs and record keys (TIDs) increase per account
regardless of how fast frames are produced.

With `history_days`, the first `history_events` events are spread over the days before
`now_us` and the rest continue from `now_us` (see `clock.VirtualClock`). Pre-populated
("prebuilt") accounts are added with `add_prebuilt`: their repos exist from the start and no
event ever mentions them (see `prebuilt`).

`truth()` describes the final state after the frames produced so far, in the truth-file
format of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from firehose.devnet import dagcbor, frames
from firehose.devnet import records as rec
from firehose.devnet.accounts import STATUS_ACTIVE, STATUS_DELETED, Account, IndexedSet
from firehose.devnet.accounts import did_document as did_document
from firehose.devnet.clock import MAX_EVENT_GAP_US as MAX_EVENT_GAP_US
from firehose.devnet.clock import VirtualClock
from firehose.devnet.keys import SigningKey
from firehose.devnet.options import DEFAULT_START_TIME_US as DEFAULT_START_TIME_US
from firehose.devnet.plc import genesis_operation
from firehose.devnet.repo import ACTION_CREATE, ACTION_DELETE, ACTION_UPDATE, Repo, Write
from firehose.devnet.tid import CLOCK_ID_MASK, tid
from firehose.devnet.truth import accounts_truth

DEFAULT_PDS_ENDPOINT = "http://127.0.0.1:2583"
BIRTH_PROBABILITY = 0.08  # chance per event that a not-yet-seen account signs up
MIN_ACTIVE_ACCOUNTS = 3  # status changes never leave fewer active accounts than this
RECENT_POSTS = 2000  # posts remembered as reply/quote/like targets
FORGER_KEY_BASE = 2_000_000  # forger keys: even offset, so each has its victim's curve
INACTIVE_STATUSES = ("deactivated",) * 3 + ("takendown", "suspended") * 2 + ("deleted",)

# Relative weights of what an active account does next.
_ACTIONS: tuple[tuple[str, float], ...] = (
    ("post", 22),
    ("like", 28),
    ("repost", 7),
    ("follow", 10),
    ("block", 1),
    ("profile", 2),
    ("list", 1),
    ("listitem", 2),
    ("feed_generator", 0.3),
    ("starterpack", 0.3),
    ("note", 3),
    ("delete", 8),
    ("recreate", 1),
    ("multi", 4),
    ("identity", 0.6),
    ("status", 1.0),
)


class Generator:
    def __init__(
        self,
        seed: int = 0,
        accounts: int = 200,
        start_time_us: int = DEFAULT_START_TIME_US,
        pds_endpoint: str = DEFAULT_PDS_ENDPOINT,
        *,
        now_us: int | None = None,
        history_days: float = 0.0,
        history_events: int = 0,
        forge_every: int = 0,
    ) -> None:
        if accounts < 1:
            raise ValueError("need at least one account")
        self.seed = seed
        self.account_count = accounts
        self.pds_endpoint = pds_endpoint
        self.rng = random.Random(seed)
        self.factory = rec.RecordFactory(self.rng)
        self.clock_id = seed & CLOCK_ID_MASK
        self.clock = VirtualClock(
            start_time_us,
            now_us=now_us,
            history_days=history_days,
            history_events=history_events,
        )
        self.now_us = self.clock.current_us  # the current event's moment
        self.seq = 0
        self.accounts: list[Account] = []  # born accounts, in birth order
        self.by_did: dict[str, Account] = {}
        self.prebuilt: list[Account] = []  # quiet accounts with pre-populated repos
        self.active = IndexedSet()  # dids of active accounts
        self.inactive = IndexedSet()  # dids deactivated/takendown/suspended (not deleted)
        self.posts: deque[rec.PostRef] = deque(maxlen=RECENT_POSTS)
        self.feeds: deque[str] = deque(maxlen=100)
        self._queue: deque[Callable[[], bytes]] = deque()
        self._new_rkeys = 0
        # Fault injection (--forge-every N): every Nth event is a commit signed with the
        # wrong key (`_forge`); `forged` lists its record uris, which are never in the truth.
        self.forge_every = forge_every
        self.forged: list[str] = []
        self._forgers: dict[str, SigningKey] = {}
        names = [name for name, _ in _ACTIONS]
        weights = [weight for _, weight in _ACTIONS]
        self._action_names = names
        self._action_cum = [sum(weights[: i + 1]) for i in range(len(weights))]

    # ---- the event loop -------------------------------------------------------------------

    def next_frame(self) -> bytes:
        """Produce the next event (seq = previous + 1) as an encoded frame."""
        self.seq += 1
        self.now_us = self.clock.tick(self.rng)
        self._new_rkeys = 0
        if self.forge_every and self.seq % self.forge_every == 0 and len(self.active):
            return self._forge()
        if self._queue:
            return self._queue.popleft()()
        unborn = len(self.accounts) < self.account_count
        if unborn and (
            len(self.active) < MIN_ACTIVE_ACCOUNTS or self.rng.random() < BIRTH_PROBABILITY
        ):
            return self._birth()
        if not len(self.active):
            return self._reactivate()
        (name,) = self.rng.choices(self._action_names, cum_weights=self._action_cum)
        did = self.active.choice(self.rng)
        assert did is not None
        frame: bytes = getattr(self, f"_act_{name}")(self.by_did[did])
        return frame

    def frames(self, count: int) -> list[bytes]:
        return [self.next_frame() for _ in range(count)]

    @property
    def time_str(self) -> str:
        return frames.rfc3339_millis(self.now_us)

    def add_prebuilt(self, accounts: list[Account]) -> None:
        """Register quiet, pre-populated accounts (never chosen to act in an event)."""
        for account in accounts:
            if account.did in self.by_did:
                raise ValueError(f"duplicate did {account.did}")
            self.by_did[account.did] = account
            self.prebuilt.append(account)

    def all_accounts(self) -> list[Account]:
        """Creation order: pre-populated accounts first, then sign-ups as they happen."""
        return [*self.prebuilt, *self.accounts]

    def truth(self) -> dict[str, Any]:
        """Final state after the frames produced so far (docs/ARCHITECTURE.md, truth file)."""
        truth = accounts_truth(self.all_accounts(), self.seq, self.clock.now_us)
        if self.forged:
            truth["forged"] = sorted(self.forged)
        return truth

    # ---- helpers ------------------------------------------------------------------------------

    def _rkey(self) -> str:
        """A fresh TID record key: the virtual clock is unique per event, the clock id part
        separates several new records of one event."""
        self._new_rkeys += 1
        return tid(self.now_us, (self.clock_id + self._new_rkeys) & CLOCK_ID_MASK)

    def _commit(self, account: Account, writes: list[Write]) -> bytes:
        commit = account.repo.commit(writes, tid(self.now_us, self.clock_id))
        for op in commit.ops:
            if op.action == ACTION_DELETE:
                account.live.discard(op.path)
                account.deleted.add(op.path)
                continue
            account.live.add(op.path)
            account.deleted.discard(op.path)
            if op.action == ACTION_CREATE and op.cid is not None:
                self._remember(account, op.path, op.cid, writes)
        return frames.commit(self.seq, commit, self.time_str)

    def _remember(self, account: Account, path: str, cid: bytes, writes: list[Write]) -> None:
        collection = path.split("/", 1)[0]
        uri = f"at://{account.did}/{path}"
        if collection == rec.POST:
            ref = rec.StrongRef(uri, cid)
            record = next(w.record for w in writes if w.path == path)
            reply = record.get("reply") if record else None
            root = (
                rec.StrongRef(reply["root"]["uri"], dagcbor.cid_from_str(reply["root"]["cid"]))
                if reply
                else ref
            )
            self.posts.append(rec.PostRef(ref, root))
        elif collection == rec.LIST:
            account.lists.append(uri)
        elif collection == rec.FEED_GENERATOR:
            self.feeds.append(uri)

    def _other_did(self, account: Account) -> str:
        other = self.accounts[self.rng.randrange(len(self.accounts))]
        return (
            other.did if other is not account or len(self.accounts) == 1 else self.accounts[0].did
        )

    def _record_for(self, account: Account, collection: str) -> dict[str, Any]:
        """A new record value of `collection` by `account` (subjects picked at random)."""
        now, f = self.time_str, self.factory
        if collection in (rec.LIKE, rec.REPOST) and self.posts:
            return f.subject(collection, self.rng.choice(self.posts).ref, now)
        if collection in (rec.FOLLOW, rec.BLOCK):
            return f.graph(collection, self._other_did(account), now)
        if collection == rec.PROFILE:
            return f.profile(account.handle, now)
        if collection == rec.LIST:
            return f.graph_list(now)
        if collection == rec.LISTITEM and account.lists:
            return f.listitem(self.rng.choice(account.lists), self._other_did(account), now)
        if collection == rec.FEED_GENERATOR:
            return f.feed_generator(now)
        if collection == rec.STARTERPACK and account.lists:
            feeds = list(self.feeds)[-3:]
            return f.starterpack(self.rng.choice(account.lists), feeds, now)
        if collection == rec.CUSTOM_NOTE:
            return f.note(now)
        return self._post_record(account)

    def _post_record(self, account: Account) -> dict[str, Any]:
        rng = self.rng
        parent = rng.choice(self.posts) if self.posts and rng.random() < 0.3 else None
        quote = rng.choice(self.posts) if self.posts and rng.random() < 0.08 else None
        mentions = [
            (a.handle, a.did) for a in rng.sample(self.accounts, min(2, len(self.accounts)))
        ]
        return self.factory.post(self.time_str, mentions, parent, quote)

    def _create(self, account: Account, collection: str) -> bytes:
        record = self._record_for(account, collection)
        path = f"{record['$type']}/{self._rkey()}"
        return self._commit(account, [Write(ACTION_CREATE, path, record)])

    def _forge(self) -> bytes:
        """A commit signed with the wrong key (same curve, another secret), chained onto the
        account's real head (since, prevData), so only its signature gives it away. It is
        built in a throwaway repo: the account's repo is untouched, so the next genuine
        commit continues from the last genuine one and the forged record is in no truth."""
        did = self.active.choice(self.rng)
        assert did is not None
        account = self.by_did[did]
        forger = self._forgers.get(did)
        if forger is None:
            forger = SigningKey.from_seed(self.seed, FORGER_KEY_BASE + account.index)
            self._forgers[did] = forger
        path = f"{rec.POST}/{self._rkey()}"
        record = {"$type": rec.POST, "text": "forged", "createdAt": self.time_str}
        shadow = Repo(did, forger).commit(
            [Write(ACTION_CREATE, path, record)], tid(self.now_us, self.clock_id)
        )
        forged = dataclasses.replace(shadow, since=account.repo.rev, prev_data=account.repo.data)
        self.forged.append(f"at://{did}/{path}")
        return frames.commit(self.seq, forged, self.time_str)

    # ---- lifecycle events ---------------------------------------------------------------------

    def _birth(self) -> bytes:
        """A sign-up: #identity (with handle), then #account active, then the first commit."""
        index = len(self.accounts)
        key = SigningKey.from_seed(self.seed, index)
        handle = f"{rec._NAMES[index % len(rec._NAMES)].lower()}-{index}.devnet.test"
        identity = genesis_operation(key, handle, self.pds_endpoint)
        account = Account(
            index,
            key,
            identity.did,
            handle,
            self.pds_endpoint,
            identity.genesis_op,
            Repo(identity.did, key),
        )
        self.accounts.append(account)
        self.by_did[account.did] = account
        self._queue.append(lambda: frames.account(self.seq, account.did, self.time_str, None))

        def first_commit() -> bytes:
            self.active.add(account.did)
            profile = self.factory.profile(handle, self.time_str)
            path = f"{rec.PROFILE}/{rec.PROFILE_RKEY}"
            return self._commit(account, [Write(ACTION_CREATE, path, profile)])

        self._queue.append(first_commit)
        return frames.identity(self.seq, account.did, self.time_str, handle)

    def _reactivate(self) -> bytes:
        did = self.inactive.choice(self.rng)
        assert did is not None, "no account can act"
        account = self.by_did[did]
        self.inactive.discard(did)
        self.active.add(did)
        account.status = STATUS_ACTIVE
        return frames.account(self.seq, did, self.time_str, None)

    def _act_identity(self, account: Account) -> bytes:
        account.handle_changes += 1
        base = account.handle.split(".", 1)[0].split("-v", 1)[0]
        account.handle = f"{base}-v{account.handle_changes}.devnet.test"
        return frames.identity(self.seq, account.did, self.time_str, account.handle)

    def _act_status(self, account: Account) -> bytes:
        if len(self.inactive) and self.rng.random() < 0.5:
            return self._reactivate()
        if len(self.active) <= MIN_ACTIVE_ACCOUNTS:
            return self._act_post(account)
        status = self.rng.choice(INACTIVE_STATUSES)
        account.status = status
        self.active.discard(account.did)
        if status != STATUS_DELETED:  # deleted is final: the account never commits again
            self.inactive.add(account.did)
        return frames.account(self.seq, account.did, self.time_str, status)

    # ---- repo actions -------------------------------------------------------------------------

    def _act_post(self, account: Account) -> bytes:
        return self._create(account, rec.POST)

    def _act_like(self, account: Account) -> bytes:
        return self._create(account, rec.LIKE)

    def _act_repost(self, account: Account) -> bytes:
        return self._create(account, rec.REPOST)

    def _act_follow(self, account: Account) -> bytes:
        return self._create(account, rec.FOLLOW)

    def _act_block(self, account: Account) -> bytes:
        return self._create(account, rec.BLOCK)

    def _act_list(self, account: Account) -> bytes:
        return self._create(account, rec.LIST)

    def _act_listitem(self, account: Account) -> bytes:
        return self._create(account, rec.LISTITEM if account.lists else rec.LIST)

    def _act_feed_generator(self, account: Account) -> bytes:
        return self._create(account, rec.FEED_GENERATOR)

    def _act_starterpack(self, account: Account) -> bytes:
        return self._create(account, rec.STARTERPACK if account.lists else rec.LIST)

    def _act_profile(self, account: Account) -> bytes:
        path = f"{rec.PROFILE}/{rec.PROFILE_RKEY}"
        action = ACTION_UPDATE if path in account.live else ACTION_CREATE
        record = self.factory.profile(account.handle, self.time_str)
        return self._commit(account, [Write(action, path, record)])

    def _act_note(self, account: Account) -> bytes:
        notes = [p for p in account.live.items[-20:] if p.startswith(rec.CUSTOM_NOTE)]
        if notes and self.rng.random() < 0.3:
            record = self.factory.note(self.time_str)
            return self._commit(account, [Write(ACTION_UPDATE, self.rng.choice(notes), record)])
        return self._create(account, rec.CUSTOM_NOTE)

    def _act_delete(self, account: Account) -> bytes:
        path = account.live.choice(self.rng)
        if path is None:
            return self._act_post(account)
        return self._commit(account, [Write(ACTION_DELETE, path)])

    def _act_recreate(self, account: Account) -> bytes:
        """Create a record again at a path that was deleted earlier (same collection/rkey)."""
        path = account.deleted.choice(self.rng)
        if path is None:
            return self._act_delete(account)
        record = self._record_for(account, path.split("/", 1)[0])
        if record["$type"] != path.split("/", 1)[0]:  # no subject available for it yet
            return self._act_post(account)
        return self._commit(account, [Write(ACTION_CREATE, path, record)])

    def _act_multi(self, account: Account) -> bytes:
        """An applyWrites-style commit: several creates plus an update or delete."""
        writes: list[Write] = []
        for _ in range(self.rng.randint(1, 3)):
            collection = self.rng.choice((rec.POST, rec.LIKE, rec.FOLLOW, rec.CUSTOM_NOTE))
            record = self._record_for(account, collection)
            writes.append(Write(ACTION_CREATE, f"{record['$type']}/{self._rkey()}", record))
        path = account.live.choice(self.rng)
        if path is not None:
            if self.rng.random() < 0.5:
                writes.append(Write(ACTION_DELETE, path))
            else:
                record = self._record_for(account, path.split("/", 1)[0])
                if record["$type"] == path.split("/", 1)[0]:
                    writes.append(Write(ACTION_UPDATE, path, record))
        return self._commit(account, writes)
