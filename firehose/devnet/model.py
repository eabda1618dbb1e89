"""The history model (`--history-model year`): accounts whose repos grew commit by commit
over the year before the devnet's now, shaped like the network a window backfill meets.

Issue 9 measures a `BACKFILL_DAYS=30` backfill on such a network, so what matters is who
wrote what when, and which blocks each commit first wrote (`Repo.block_revs`, the reference
PDS's repo_block.repoRev): `getRepo?since=` and the truth's `history` are computed from it.

Each account (deterministic by seed and index, like `prebuilt`) is one of:

* ``dormant`` (~85%): quiet for 35+ days. Most were active on a few days (1-6 writes each);
  ~30% are churned daily writers (a commit of 1-2 writes every day for a month or more,
  then nothing), which is what the real network is full of: its mean repo is ~460 KiB,
  far more than a few days of activity make, and most of its ~40 M accounts write nothing
  in a given month (~15% active: the README's estimate for the real network assumes the
  same share);
* ``casual`` (~8.5%): active on a few days of the year, the last one inside the last 30 days;
* ``daily`` (~6%): created 45-365 days ago, then a commit (1-2 writes) every day up to
  the last day before now;
* ``heavy`` (~0.5%, and always the first model account when there are 20 or more):
  created early in the year, a commit every day with 3-9 writes: about two thousand records.

A commit is one day's activity: creates (likes, posts, follows, reposts, keyed by TIDs of
their moment, `createdAt` equal to it), sometimes a delete of an older record (so records
created before a window are deleted inside it) and, for ~10% of accounts, notes of the
custom lexicon `MODEL_NOTE` (created, sometimes edited in place). Every account's
``app.bsky.actor.profile/self`` is written by its first commit (for most accounts more than
30 days ago); ~30% of the active accounts update it inside the last 30 days, keeping its
`createdAt` as the app does. The rev of a commit is a TID just after its last write.

Commits nobody will see are applied with `Repo.advance` (no signature, no CAR); only the
last is signed (`Repo.seal`): the blocks and their first revs are the same as if every
commit had been signed. Like prebuilt accounts, these exist only through listRepos, getRepo,
getRecord, the PLC directory and the truth file; no firehose event mentions them.
"""

from __future__ import annotations

import random
from typing import Any

from firehose.devnet import dagcbor, frames
from firehose.devnet import records as rec
from firehose.devnet.accounts import Account, IndexedSet
from firehose.devnet.clock import DAY_US
from firehose.devnet.keys import SigningKey
from firehose.devnet.options import MODEL_YEAR as MODEL_YEAR
from firehose.devnet.options import MODELS as MODELS
from firehose.devnet.plc import genesis_operation
from firehose.devnet.prebuilt import PrebuiltFactory, build_chunks
from firehose.devnet.repo import ACTION_CREATE, ACTION_DELETE, ACTION_UPDATE, Repo, Write
from firehose.devnet.tid import CLOCK_ID_MASK, tid
from firehose.devnet.truth import account_entries

MODEL_NOTE = "com.example.devnet.model.note"  # the custom lexicon ~10% of accounts write
SPAN_DAYS = 365
QUIET_MIN_DAYS = 35  # a dormant account's last commit is at least this old
WINDOW_DAYS = 30  # the window the model is shaped around (casual: a commit inside it)
KIND_DORMANT, KIND_CASUAL, KIND_DAILY, KIND_HEAVY = "dormant", "casual", "daily", "heavy"
_KIND_CUM = ((KIND_HEAVY, 0.005), (KIND_DAILY, 0.065), (KIND_CASUAL, 0.15))  # else dormant
NOTE_ACCOUNTS = 0.10
CHURNED_DORMANT = 0.3  # dormant accounts that wrote daily for a month or more, then stopped
PROFILE_UPDATE_ACTIVE = 0.30  # active accounts that update their profile in the window
DELETE_PER_COMMIT = 0.12
HANDLE_SUFFIX = ".devnet.test"
CHUNK_ACCOUNTS = 25  # fixed chunks: the same result in-process or in a pool of any size
PARALLEL_MIN_ACCOUNTS = 200  # below this a process pool costs more than it saves
_MIX = ((rec.LIKE, 40), (rec.POST, 25), (rec.FOLLOW, 20), (rec.REPOST, 15))
_MIX_CUM = [sum(w for _, w in _MIX[: i + 1]) for i in range(len(_MIX))]
_MIX_NAMES = [name for name, _ in _MIX]
PROFILE_PATH = f"{rec.PROFILE}/{rec.PROFILE_RKEY}"


def model_kind(rng: random.Random, index_in_model: int, count: int) -> str:
    if count >= 20 and index_in_model == 0:
        return KIND_HEAVY  # "a few are heavy": never none on a sizeable model
    draw = rng.random()
    for kind, bound in _KIND_CUM:
        if draw < bound:
            return kind
    return KIND_DORMANT


def _active_days(rng: random.Random, kind: str) -> list[int]:
    """Days (0 = 365 days before now, 364 = the last day) with a commit, ascending."""
    last = SPAN_DAYS - 1
    window_start = SPAN_DAYS - WINDOW_DAYS
    if kind == KIND_HEAVY:
        return list(range(rng.randrange(0, 60), SPAN_DAYS))
    if kind == KIND_DAILY:
        return list(range(rng.randrange(0, SPAN_DAYS - 45), SPAN_DAYS))
    if kind == KIND_CASUAL:
        created = rng.randrange(0, SPAN_DAYS - 45)
        final = rng.randrange(window_start + 1, last + 1)
        k = min(final - created - 1, rng.randint(2, 25))
        middle = rng.sample(range(created + 1, final), k=k)
        return [created, *sorted(middle), final]
    quiet_last = SPAN_DAYS - QUIET_MIN_DAYS  # dormant
    if rng.random() < CHURNED_DORMANT:
        # Once a daily writer, then gone: the network is full of them (its mean repo is
        # ~460 KiB, far more than a few days of activity make).
        created = rng.randrange(0, quiet_last - 60)
        return list(range(created, rng.randrange(created + 30, quiet_last)))
    created = rng.randrange(0, quiet_last - 20)
    final = rng.randrange(created + 1, quiet_last)
    middle = rng.sample(range(created + 1, final), k=min(final - created - 1, rng.randint(1, 20)))
    return [created, *sorted(middle), final]


class ModelFactory:
    """Builds model accounts in order; later accounts like/follow earlier ones."""

    def __init__(self, seed: int, pds_endpoint: str, now_us: int, count: int) -> None:
        self.seed = seed
        self.pds_endpoint = pds_endpoint
        self.now_us = now_us
        self.count = count
        self.values = PrebuiltFactory(seed, pds_endpoint)  # subject pools for likes etc.

    def build(self, index: int, index_in_model: int) -> Account:
        rng = random.Random(f"model|{self.seed}|{index}")
        kind = model_kind(rng, index_in_model, self.count)
        writes_notes = rng.random() < NOTE_ACCOUNTS
        key = SigningKey.from_seed(self.seed, index)
        handle = f"model-{index}{HANDLE_SUFFIX}"
        identity = genesis_operation(key, handle, self.pds_endpoint)
        did = identity.did
        clock_id = rng.randrange(CLOCK_ID_MASK + 1)
        repo = Repo(did, key)
        account = Account(index, key, did, handle, self.pds_endpoint, identity.genesis_op, repo)
        account.model_kind = kind
        live = IndexedSet()  # paths a delete may pick (not the profile)
        notes: list[str] = []
        days = _active_days(rng, kind)
        daily_run = len(days) > 1 and days[-1] - days[0] == len(days) - 1  # churned writer
        window_start = SPAN_DAYS - WINDOW_DAYS
        profile_day = -1
        if kind != KIND_DORMANT and rng.random() < PROFILE_UPDATE_ACTIVE:
            in_window = [day for day in days if day >= window_start and day != days[0]]
            profile_day = rng.choice(in_window) if in_window else -1
        elif kind == KIND_DORMANT and len(days) > 2 and rng.random() < 0.2:
            profile_day = days[-1]
        profile_created = ""
        day0_us = self.now_us - SPAN_DAYS * DAY_US
        for n, day in enumerate(days):
            start_us = day0_us + day * DAY_US
            if kind == KIND_HEAVY:
                creates = rng.randint(3, 9)
            elif kind == KIND_DAILY or daily_run:
                creates = rng.randint(1, 2)
            else:
                creates = rng.randint(1, 6)
            # One moment per write inside the day, the rev just after the last one; the
            # last day ends an hour before now so every rev is in the past.
            span = DAY_US - 3_600_000_000 - creates - 2
            moments = sorted(start_us + rng.randrange(span) for _ in range(creates))
            for i in range(1, len(moments)):
                moments[i] = max(moments[i], moments[i - 1] + 1)
            writes: list[Write] = []
            if n == 0:
                profile_created = frames.rfc3339_millis(moments[0])
                profile = rec.RecordFactory(rng).profile(handle, profile_created)
                writes.append(Write(ACTION_CREATE, PROFILE_PATH, profile))
            elif day == profile_day:
                profile = rec.RecordFactory(rng).profile(handle, profile_created)
                writes.append(Write(ACTION_UPDATE, PROFILE_PATH, profile))
            if n and rng.random() < DELETE_PER_COMMIT and len(live):
                victim = live.choice(rng)
                assert victim is not None
                live.discard(victim)
                if victim in notes:
                    notes.remove(victim)
                writes.append(Write(ACTION_DELETE, victim))
            elif notes and rng.random() < 0.1:
                path = rng.choice(notes)
                value = self._note(rng, frames.rfc3339_millis(moments[0]))
                writes.append(Write(ACTION_UPDATE, path, value, dagcbor.encode_ordered(value)))
            for moment in moments:
                rkey = tid(moment, clock_id)
                created_at = frames.rfc3339_millis(moment)
                if writes_notes and rng.random() < 0.3:
                    value = self._note(rng, created_at)
                else:
                    (collection,) = rng.choices(_MIX_NAMES, cum_weights=_MIX_CUM)
                    value = self.values.record_value(rng, collection, did, rkey, created_at)
                path = f"{value['$type']}/{rkey}"
                writes.append(Write(ACTION_CREATE, path, value, dagcbor.encode_ordered(value)))
                live.add(path)
                if value["$type"] == MODEL_NOTE:
                    notes.append(path)
            rev = tid(moments[-1] + 1, clock_id)
            account.model_deletes += [(w.path, rev) for w in writes if w.action == ACTION_DELETE]
            repo.advance(writes, rev)
        repo.seal()
        for path in repo.records:
            account.live.add(path)
        self.values.dids.append(did)
        return account

    @staticmethod
    def _note(rng: random.Random, created_at: str) -> dict[str, Any]:
        text = " ".join(rng.choices(rec._WORDS, k=rng.randint(1, 12)))
        return {"text": text, "$type": MODEL_NOTE, "createdAt": created_at}  # DAG-CBOR order


def _build_chunk(
    seed: int, pds_endpoint: str, now_us: int, count: int, first: int, start: int, size: int
) -> list[Account]:
    factory = ModelFactory(seed, pds_endpoint, now_us, count)
    accounts = [factory.build(first + start + i, start + i) for i in range(size)]
    for account in accounts:
        account_entries(account)  # the truth entries too, while in parallel
        account.repo.full_car()  # and the getRepo order, and the whole CAR
    return accounts


def build_model_accounts(
    seed: int, pds_endpoint: str, first_index: int, count: int, now_us: int
) -> list[Account]:
    """`count` model accounts with key indexes first_index.. (after every other account).
    Chunks run in a spawned process pool when the model is big (see `prebuilt`)."""
    chunks = [
        (seed, pds_endpoint, now_us, count, first_index, start, min(CHUNK_ACCOUNTS, count - start))
        for start in range(0, count, CHUNK_ACCOUNTS)
    ]
    return build_chunks(_build_chunk, chunks, parallel=count >= PARALLEL_MIN_ACCOUNTS)
