"""Pre-populated ("prebuilt") accounts: big repos built directly, without firehose events.

Generating K records per account through signed commits, one event each, runs at the
generator's ~2k events/s; the backfill benchmark wants 1,000 repos x 500 records. So these
accounts get their final repo in one go: the records, one MST built bottom-up and ONE signed
commit (`Repo.load`). They behave like accounts that existed before the relay started:
listRepos (relay and PDS) lists them, getRepo serves them, the PLC directory resolves them,
the truth file includes their records, but no firehose event ever mentions them (they never
act in the generated traffic either, so their repos never change).

Record keys are TIDs (https://atproto.com/specs/tid) at moments spread over
``[span_start_us, span_end_us)``, `createdAt` equal to that moment, plus one
`app.bsky.actor.profile/self` (a non-TID key whose time comes from `createdAt`). The rev is
a TID just after the newest record. Values are written with keys already in DAG-CBOR order
(`dagcbor.encode_ordered`), several times faster than canonical sorting, which is what
makes the bulk path cheap; the tests re-check every block with an independent decoder.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from firehose.devnet import dagcbor, frames
from firehose.devnet import records as rec
from firehose.devnet.accounts import Account
from firehose.devnet.keys import SigningKey
from firehose.devnet.plc import genesis_operation
from firehose.devnet.repo import Repo
from firehose.devnet.tid import CLOCK_ID_MASK, tid
from firehose.devnet.truth import account_entries

HANDLE_SUFFIX = ".devnet.test"
SUBJECT_POOL = 4096  # recent posts / dids that likes, reposts and follows point at
# Accounts are built in fixed chunks (each with its own subject pools), so the result is
# the same whether chunks run in this process or in a pool of any size.
CHUNK_ACCOUNTS = 25
PARALLEL_MIN_RECORDS = 50_000  # below this, a process pool costs more than it saves
# Collection mix of the bulk records (cumulative weights): likes dominate real repos.
_MIX = ((rec.LIKE, 40), (rec.POST, 25), (rec.FOLLOW, 20), (rec.REPOST, 15))
_MIX_CUM = [sum(w for _, w in _MIX[: i + 1]) for i in range(len(_MIX))]
_MIX_NAMES = [name for name, _ in _MIX]


class PrebuiltFactory:
    """Builds prebuilt accounts in order; later accounts like/follow earlier ones."""

    def __init__(self, seed: int, pds_endpoint: str) -> None:
        self.seed = seed
        self.pds_endpoint = pds_endpoint
        self.posts: list[dict[str, Any]] = []  # strongRef values, ring of SUBJECT_POOL
        self.dids: list[str] = []

    def build(
        self,
        index: int,
        records: int,
        span_start_us: int,
        span_end_us: int,
        did: str | None = None,
    ) -> Account:
        """Account `index` (its key is `SigningKey.from_seed(seed, index)`) with `records`
        TID-keyed records spread over the span, plus its profile. `did` overrides the
        did:plc derived from the genesis operation (for did:web)."""
        rng = random.Random(f"prebuilt|{self.seed}|{index}")
        key = SigningKey.from_seed(self.seed, index)
        handle = f"bulk-{index}{HANDLE_SUFFIX}"
        identity = genesis_operation(key, handle, self.pds_endpoint)
        did = did or identity.did
        clock_id = rng.randrange(CLOCK_ID_MASK + 1)
        span = max(1, span_end_us - span_start_us - 1)
        moments = sorted(span_start_us + rng.randrange(span) for _ in range(records))
        for i in range(1, len(moments)):  # distinct moments: distinct TIDs, one per record
            moments[i] = max(moments[i], moments[i - 1] + 1)
        built: list[tuple[str, bytes, bytes]] = []
        for moment in moments:
            rkey = tid(moment, clock_id)
            created_at = frames.rfc3339_millis(moment)
            (collection,) = rng.choices(_MIX_NAMES, cum_weights=_MIX_CUM)
            value = self.record_value(rng, collection, did, rkey, created_at)
            path = f"{value['$type']}/{rkey}"
            block = dagcbor.encode_ordered(value)
            built.append((path, dagcbor.cid_for_block(block), block))
        first = frames.rfc3339_millis(moments[0] if moments else span_start_us)
        profile_cid, profile_block = dagcbor.encode_block(
            rec.RecordFactory(rng).profile(handle, first)
        )
        built.append((f"{rec.PROFILE}/{rec.PROFILE_RKEY}", profile_cid, profile_block))
        repo = Repo(did, key)
        newest = moments[-1] if moments else span_start_us
        repo.load(built, tid(newest + 1, clock_id))
        self.dids.append(did)
        account = Account(index, key, did, handle, self.pds_endpoint, identity.genesis_op, repo)
        for path, _, _ in built:
            account.live.add(path)
        return account

    def record_value(
        self, rng: random.Random, collection: str, did: str, rkey: str, created_at: str
    ) -> dict[str, Any]:
        """A like, repost, follow (of earlier subjects) or post at `rkey`, keys in DAG-CBOR
        order (encode with `dagcbor.encode_ordered`)."""
        # Keys in DAG-CBOR order: shorter first, then bytewise ("$type" < "langs").
        if collection in (rec.LIKE, rec.REPOST) and self.posts:
            subject = self.posts[rng.randrange(len(self.posts))]
            return {"$type": collection, "subject": subject, "createdAt": created_at}
        if collection == rec.FOLLOW and self.dids:
            subject_did = self.dids[rng.randrange(len(self.dids))]
            return {"$type": collection, "subject": subject_did, "createdAt": created_at}
        text = " ".join(rng.choices(rec._WORDS, k=rng.randint(1, 12)))
        value = {"text": text, "$type": rec.POST, "langs": ["en"], "createdAt": created_at}
        cid = dagcbor.cid_for_block(dagcbor.encode_ordered(value))
        # com.atproto.repo.strongRef: `cid` is a string (format cid), not a link, as
        # records.StrongRef writes it and as the reference PDS stores likes and reposts.
        ref = {"cid": dagcbor.cid_str(cid), "uri": f"at://{did}/{rec.POST}/{rkey}"}
        if len(self.posts) < SUBJECT_POOL:
            self.posts.append(ref)
        else:
            self.posts[rng.randrange(SUBJECT_POOL)] = ref
        return value


def _build_chunk(
    seed: int, pds_endpoint: str, first: int, count: int, records: int, span: tuple[int, int]
) -> list[Account]:
    factory = PrebuiltFactory(seed, pds_endpoint)
    accounts = [factory.build(first + i, records, *span) for i in range(count)]
    for account in accounts:
        account_entries(account)  # the truth entries too, while in parallel
        # and the getRepo order (sorted by first rev and CID string: ~5 s of the devnet's
        # CPU for 1,000 x 500 if left to the first requests, inside a benchmark's clock) and
        # the whole CAR a getRepo without `since` sends
        account.repo.full_car()
    return accounts


def build_accounts(
    seed: int,
    pds_endpoint: str,
    first_index: int,
    count: int,
    records: int,
    span: tuple[int, int],
) -> list[Account]:
    """`count` prebuilt accounts with indexes first_index.. (keys never collide with the
    generator's accounts 0..first_index-1). ~40 ms per 500-record account on one core, so
    big sets are built by a process pool (spawned: forking a process that runs an event
    loop is unsafe)."""
    chunks = [
        (seed, pds_endpoint, first_index + start, min(CHUNK_ACCOUNTS, count - start), records, span)
        for start in range(0, count, CHUNK_ACCOUNTS)
    ]
    return build_chunks(_build_chunk, chunks, parallel=count * records >= PARALLEL_MIN_RECORDS)


def build_chunks(
    build: Callable[..., list[Account]], chunks: list[tuple[Any, ...]], *, parallel: bool
) -> list[Account]:
    """`build(*chunk)` for every chunk, in order, concatenated: in a spawned process pool
    when `parallel` and there are two cores or more, else here. Fixed chunks give the same
    result either way."""
    workers = min(os.cpu_count() or 1, len(chunks))
    if not parallel or workers < 2:
        return [account for chunk in chunks for account in build(*chunk)]
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(build, *zip(*chunks, strict=True))
            return [account for chunk in results for account in chunk]
    except BrokenProcessPool:  # e.g. a __main__ read from stdin cannot be re-imported
        return [account for chunk in chunks for account in build(*chunk)]
