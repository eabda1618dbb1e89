"""Fuzzing of the relay's enumeration pages (listRepos, listReposByCollection): untrusted
JSON bytes, decoded as `HostClient.get_json` does, then validated by `relay_http.parse_page`.

Oracle beyond "did not crash": the outcome is a page or a `FetchError` with reason
``bad_response`` (never another exception); a page's entries are valid DIDs (revs valid
TIDs, by-collection entries without rev), entries kept + entries dropped = entries sent, and
its cursor is None or a bounded string other than the request's (a cursor that does not
advance would page forever). Seeds are well-formed pages of both methods; mutations are the
byte mutations of tests/fuzz/mutations.py and generated hostile JSON values. Budget and
reproducibility as tests/test_fuzz_protocol.py (``FUZZ_EXAMPLES``, ``FUZZ_SEED``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from fuzz.mutations import mutated
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from backfill.hosts import FetchError
from backfill.relay_http import (
    MAX_CURSOR_CHARS,
    ListReposPage,
    parse_list_repos,
    parse_list_repos_by_collection,
)
from firehose.protocol.syntax import is_did, is_tid

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 400)
SEED = os.environ.get("FUZZ_SEED")
REQUEST_CURSORS = (None, "c2", "did:plc:ewvi7nxzyoun6zhxrhs64oiz")

_DIDS = ["did:plc:ewvi7nxzyoun6zhxrhs64oiz", "did:web:example.com", "did:plc:" + "a" * 24]
_HEAD = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


def _list_repos_entry(i: int, did: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"did": did, "head": _HEAD, "rev": "3lk2aaaaaaa22", "active": i != 1}
    if i == 1:
        entry["status"] = "deactivated"
    return entry


SEEDS = tuple(
    json.dumps(doc).encode()
    for doc in (
        {"cursor": "c2", "repos": [_list_repos_entry(i, d) for i, d in enumerate(_DIDS)]},
        {"cursor": "1734000000000::did:plc:x", "repos": [{"did": d} for d in _DIDS]},
        {"repos": [{"did": _DIDS[0]}]},
        {"repos": []},
    )
)


def budget(fn: Any) -> Any:
    configured = settings(
        max_examples=EXAMPLES,
        derandomize=SEED is None,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )(fn)
    return seed(int(SEED))(configured) if SEED is not None else configured


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from([*_DIDS, "3lk2aaaaaaa22", "", "x" * 2000]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["did", "rev", "head", "active", "status", "cursor", "repos", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def check(data: bytes, request_cursor: str | None) -> None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return  # HostClient answers FetchError(bad_response): not the parser's input
    for parse, by_collection in ((parse_list_repos, False), (parse_list_repos_by_collection, True)):
        try:
            page = parse(doc, request_cursor)
        except FetchError as err:
            assert err.reason == "bad_response"
            continue
        check_page(page, doc, request_cursor, by_collection)


def check_page(
    page: ListReposPage, doc: Any, request_cursor: str | None, by_collection: bool
) -> None:
    assert len(page.repos) + page.invalid == len(doc["repos"])
    for ref in page.repos:
        assert is_did(ref.did)
        assert ref.rev is None or is_tid(ref.rev)
        if by_collection:
            assert ref.rev is None and ref.head is None and ref.active
    if page.cursor is not None:
        assert type(page.cursor) is str and 0 < len(page.cursor) <= MAX_CURSOR_CHARS
        assert page.cursor != request_cursor


@budget
@given(mutated(SEEDS, "json"), st.sampled_from(REQUEST_CURSORS))
def test_fuzz_enumeration_pages_mutated(data: bytes, request_cursor: str | None) -> None:
    check(data, request_cursor)


@budget
@given(JSON_VALUES, st.sampled_from(REQUEST_CURSORS))
def test_fuzz_enumeration_pages_hostile_values(value: Any, request_cursor: str | None) -> None:
    for doc in (value, {"repos": value}, {"repos": [value], "cursor": value}):
        check(json.dumps(doc).encode(), request_cursor)


def test_seeds_are_accepted() -> None:
    pages = [parse_list_repos(json.loads(s), None) for s in SEEDS]
    assert [len(p.repos) for p in pages] == [3, 3, 1, 0] and pages[0].cursor == "c2"
    by_collection = parse_list_repos_by_collection(json.loads(SEEDS[1]), None)
    assert len(by_collection.repos) == 3 and by_collection.invalid == 0
