"""The truth file: the final state an indexer must hold (docs/ARCHITECTURE.md, truth file).

Besides the live-path keys (`last_seq`, `records`, `deleted`, `handles`, `statuses`) it
carries what the backfill needs: `record_times` (uri -> the backfill rule's moment in µs
since the epoch, or null: see `clock.record_time_us`), `now_us` (the devnet's "now"), and,
once the HTTP side is up, `hosts` (did -> PDS endpoint). `records` includes the records of
pre-populated accounts and of served repository CAR files (`--extra-car`): they are part
of the final state a full backfill produces even though no firehose event carries them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import cbor2

from firehose.devnet import dagcbor
from firehose.devnet.accounts import STATUS_DELETED, Account
from firehose.devnet.clock import TID_RE, record_time_us
from firehose.devnet.tid import tid


def account_entries(account: Account) -> tuple[dict[str, str], dict[str, int | None]]:
    """{uri: cid} and {uri: record time} of an account's current records (cached per rev)."""
    cache = account.truth_cache
    if cache is not None and cache[0] == account.repo.rev:
        return cache[1], cache[2]
    records: dict[str, str] = {}
    times: dict[str, int | None] = {}
    prefix = f"at://{account.did}/"
    for path, (cid, block) in account.repo.records.items():
        uri = prefix + path
        records[uri] = dagcbor.cid_str(cid)
        collection, rkey = path.split("/", 1)
        # Only non-TID keys need the value (profile "self"): decode just those.
        value = None if TID_RE.match(rkey) else cbor2.loads(block)
        times[uri] = record_time_us(rkey, value, collection)
    account.truth_cache = (account.repo.rev, records, times)
    return records, times


def accounts_truth(accounts: Iterable[Account], last_seq: int, now_us: int) -> dict[str, Any]:
    records: dict[str, str] = {}
    times: dict[str, int | None] = {}
    deleted: list[str] = []
    handles: dict[str, str] = {}
    statuses: dict[str, str] = {}
    for account in accounts:
        handles[account.did] = account.handle
        statuses[account.did] = account.status
        if account.status == STATUS_DELETED:
            continue  # a deleted account's records are gone, and so are its tombstones
        account_records, account_times = account_entries(account)
        records.update(account_records)
        times.update(account_times)
        prefix = f"at://{account.did}/"
        deleted.extend(prefix + path for path in account.deleted.items)
    return {
        "last_seq": last_seq,
        "records": dict(sorted(records.items())),
        "deleted": sorted(deleted),
        "handles": handles,
        "statuses": statuses,
        "record_times": dict(sorted(times.items())),
        "now_us": now_us,
    }


def merge_served(
    truth: dict[str, Any],
    extra: Iterable[tuple[str, dict[str, str], dict[str, int | None]]],
    hosts: dict[str, str],
) -> dict[str, Any]:
    """Add served CAR repos ``(did, records uri -> cid, record_times)`` and `hosts`."""
    records, times = dict(truth["records"]), dict(truth["record_times"])
    for did, car_records, car_times in extra:
        records.update(car_records)
        times.update(car_times)
        truth["statuses"].setdefault(did, "active")
    truth["records"] = dict(sorted(records.items()))
    truth["record_times"] = dict(sorted(times.items()))
    truth["hosts"] = hosts
    return truth


def repo_history(root: bytes, rev: str, blocks: Iterable[tuple[str, int]]) -> dict[str, Any]:
    """The truth's `history` entry of one repo from ``(first rev, section bytes)`` pairs."""
    by_rev: dict[str, list[int]] = {}
    for block_rev, size in blocks:
        entry = by_rev.setdefault(block_rev, [0, 0])
        entry[0] += 1
        entry[1] += size
    header = len(dagcbor.car_header([root]))
    return {
        "rev": rev,
        "car_bytes": header + sum(size for _, size in by_rev.values()),
        "blocks_by_rev": [[r, n, size] for r, (n, size) in sorted(by_rev.items())],
    }


def since_tid(moment_us: int) -> str:
    """The `since` a window backfill sends for a cutoff: the TID of that moment (clock id
    0, so every rev of a later moment compares greater)."""
    return tid(moment_us, 0)


def window_bytes(
    truth: dict[str, Any], since: str | None, dids: Iterable[str] | None = None
) -> int:
    """Bytes of the block sections first written after `since` (every block for None), over
    every repo of the truth's `history` (or over `dids`): what getRepo?since= sends minus
    each CAR's header."""
    history = truth["history"]
    total = 0
    for did in history if dids is None else dids:
        for rev, _, size in history[did]["blocks_by_rev"]:
            if since is None or rev > since:
                total += size
    return total


def window_blocks(truth: dict[str, Any], since: str | None, did: str) -> int:
    """Number of blocks getRepo?did=&since= returns."""
    rows = truth["history"][did]["blocks_by_rev"]
    return sum(n for rev, n, _ in rows if since is None or rev > since)


def dormant_dids(truth: dict[str, Any], since: str) -> list[str]:
    """Repos whose latest rev is not after `since`: nothing of theirs is in the window."""
    return sorted(did for did, entry in truth["history"].items() if entry["rev"] <= since)
