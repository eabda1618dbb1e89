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
        rkey = path.split("/", 1)[1]
        # Only non-TID keys need the value (profile "self"): decode just those.
        value = None if TID_RE.match(rkey) else cbor2.loads(block)
        times[uri] = record_time_us(rkey, value)
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
