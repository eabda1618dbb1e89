"""Pure parts of the backfill's narrowing (issue 9): the cutoff as a rev, the dormant rule,
the listReposByCollection page parser and the enumeration plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill.window import Window
from firehose.protocol.syntax import make_tid, parse_tid

CUTOFF = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def tid_at(t: datetime, clock: int = 0) -> str:
    return make_tid((t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1), clock)


def test_since_is_the_greatest_tid_before_the_cutoff() -> None:
    w = Window(CUTOFF)
    assert w.since is not None
    micros, clock = parse_tid(w.since)
    assert clock == 1023
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros + 1) == CUTOFF
    assert w.since < tid_at(CUTOFF, 0)
    assert Window(None).since is None
    # A cutoff before 1970 asks for everything.
    assert Window(datetime(1960, 1, 1, tzinfo=UTC)).since == make_tid(0)


@pytest.mark.parametrize(
    ("offset", "clock", "dormant"),
    [
        (timedelta(microseconds=-1), 1023, True),  # one microsecond before, any clock id
        (timedelta(days=-400), 0, True),
        (timedelta(0), 0, False),  # at the cutoff: in the window
        (timedelta(0), 5, False),
        (timedelta(microseconds=1), 0, False),
        (timedelta(days=3), 7, False),
    ],
)
def test_dormant_is_exact_at_the_cutoff(offset: timedelta, clock: int, dormant: bool) -> None:
    w = Window(CUTOFF)
    rev = tid_at(CUTOFF + offset, clock)
    assert w.dormant(rev) is dormant
    # The rule agrees with the time the rev carries.
    assert (rev <= (w.since or "")) is dormant


def test_no_rev_or_whole_history_is_never_dormant() -> None:
    old = tid_at(CUTOFF - timedelta(days=100))
    assert not Window(CUTOFF).dormant(None)
    assert not Window(CUTOFF).dormant("not-a-tid")
    assert not Window(CUTOFF).dormant("")
    assert not Window(None).dormant(old)


# -- listReposByCollection pages -----------------------------------------------------------


def test_by_collection_page_parser_shares_the_listrepos_checks() -> None:
    from backfill.hosts import FetchError
    from backfill.relay_http import parse_list_repos_by_collection

    good = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    page = parse_list_repos_by_collection(
        {
            "cursor": "next",
            "repos": [
                {"did": good, "rev": "2222222222222"},  # a rev it should not carry: ignored
                {"did": "not a did"},
                {"did": 7},
                "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
                {},
            ],
        },
        None,
    )
    assert [(r.did, r.rev, r.active) for r in page.repos] == [(good, None, True)]
    assert page.invalid == 4 and page.cursor == "next"
    bad_pages = [
        [],
        {"repos": {}},
        {"repos": [], "cursor": 5},
        {"repos": [], "cursor": "x" * 5000},
        {"cursor": "c"},
    ]
    for doc in bad_pages:
        with pytest.raises(FetchError) as info:
            parse_list_repos_by_collection(doc, None)
        assert info.value.reason == "bad_response" and "listReposByCollection" in str(info.value)
    with pytest.raises(FetchError, match="did not advance"):
        parse_list_repos_by_collection({"cursor": "c", "repos": [{"did": good}]}, "c")
    # An empty page or an empty cursor ends the pass.
    assert parse_list_repos_by_collection({"cursor": "c", "repos": []}, None).cursor is None
    assert (
        parse_list_repos_by_collection({"cursor": "", "repos": [{"did": good}]}, None).cursor
        is None
    )


def test_not_implemented_answers() -> None:
    from backfill.hosts import FetchError
    from backfill.relay_http import not_implemented

    assert not_implemented(FetchError("not_found", "HTTP 404", transient=False, status=404)) == (
        "HTTP 404"
    )
    assert not_implemented(FetchError("server_error", "HTTP 501", transient=True, status=501)) == (
        "HTTP 501"
    )
    err = FetchError("client_error", "HTTP 400 MethodNotImplemented", transient=False, status=400)
    assert not_implemented(err) == "MethodNotImplemented"
    for other in (
        FetchError("server_error", "HTTP 502", transient=True, status=502),
        FetchError("rate_limited", "paused 5 s", transient=True, status=429),
        FetchError("client_error", "HTTP 400 InvalidRequest", transient=False, status=400),
        FetchError("timeout", "relay:443", transient=True),
        ValueError("HTTP 404"),
    ):
        assert not_implemented(other) is None


# -- the enumeration plan ------------------------------------------------------------------


def test_collection_passes() -> None:
    from backfill.enum_plan import collection_passes

    post, like = "app.bsky.feed.post", "app.bsky.feed.like"
    assert collection_passes((post, like, post), True) == (like, post)
    assert collection_passes((post, "app.bsky.graph.*"), True) == ()
    assert collection_passes((post,), False) == ()
    assert collection_passes((), True) == ()
    assert collection_passes(("app.bsky.feed.post-2",), True) == ()  # not an NSID for the relay


NSIDS = ("app.a.one", "app.a.two", "com.b.three", "com.b.four")


@settings(max_examples=300, deadline=None)
@given(
    passes=st.lists(st.sampled_from(NSIDS), unique=True, max_size=4).map(
        lambda xs: tuple(sorted(xs))
    ),
    pages=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    crashes=st.lists(st.booleans(), max_size=40),
)
def test_plan_saves_every_page_of_every_pass_once(
    passes: tuple[str, ...], pages: list[int], crashes: list[bool]
) -> None:
    """Pages fetched and saved, or fetched and lost to a crash (the state is not saved, the
    step is asked again): the saved pages are exactly every pass's pages in order."""
    from backfill.enum_plan import LIST_REPOS, EnumState, after_page, next_step

    n_pages = dict(zip(NSIDS, pages, strict=True))
    state = EnumState(None, None, None)
    saved: list[tuple[str | None, str | None]] = []
    crash = iter(crashes)
    finished = False
    for _ in range(200):
        step = next_step(state, passes)
        if step is None:
            break
        if next(crash, False):
            continue  # fetched, then the process died before the page's transaction
        total = n_pages[step.collection] if step.collection else 3
        index = int(step.cursor or 0)
        next_cursor = str(index + 1) if index + 1 < total else None
        saved.append((step.collection, step.cursor))
        state, finished = after_page(step, next_cursor, passes, state.done)
        if finished:
            break
    assert finished
    if not passes:
        assert state.method == LIST_REPOS and saved == [(None, None), (None, "1"), (None, "2")]
        return
    want = [(n, None if i == 0 else str(i)) for n in passes for i in range(n_pages[n])]
    assert saved == want
    assert state.done == passes and next_step(state, passes) is None


def test_plan_after_settings_changes() -> None:
    from backfill.enum_plan import BY_COLLECTION, LIST_REPOS, EnumState, Step, next_step

    a, b = "app.a.one", "app.a.two"
    mid = EnumState(BY_COLLECTION, b, "c9", (a,))
    assert next_step(mid, (a, b)) == Step(BY_COLLECTION, b, "c9")
    # b dropped from WANTED_COLLECTIONS: its pass is abandoned; nothing left.
    assert next_step(mid, (a,)) is None
    # A new NSID added: its pass comes after the current one is abandoned or done.
    assert next_step(mid, (a, "app.a.three")) == Step(BY_COLLECTION, "app.a.three", None)
    # By collection no longer allowed: listRepos from the start.
    assert next_step(mid, ()) == Step(LIST_REPOS, None, None)
    # A listRepos job stays on listRepos, at its cursor.
    assert next_step(EnumState(LIST_REPOS, None, "c3"), (a,)) == Step(LIST_REPOS, None, "c3")
    # A job paging listRepos before sql/006 (no method, a cursor) goes on at its cursor.
    assert next_step(EnumState(None, None, "c3"), (a,)) == Step(LIST_REPOS, None, "c3")
    assert next_step(EnumState(None, None, None), (a,)) == Step(BY_COLLECTION, a, None)
