"""The backfill time window: which historical records are recent enough to keep. PURE.

`BACKFILL_DAYS=N` keeps records written at or after ``cutoff = job start - N days``; the
caller fixes the cutoff once, when the job is created, so a resumed job keeps the same
boundary (a fixed boundary between history and live data). ``-1`` keeps the whole history.

A record's time comes, in order of preference, from:

1. its record key, when the key is a TID (https://atproto.com/specs/record-key: most
   collections use ``tid`` keys, and a TID's top 53 bits are microseconds since the UNIX
   epoch, https://atproto.com/specs/tid). This needs no record decoding, so records
   outside the window are skipped before their block is even read;
2. otherwise the record's ``createdAt`` (a Lexicon ``datetime``) when it parses;
3. otherwise nothing: such records (records without a date) are kept, because dropping
   data we cannot date would silently lose current state.

One record is kept whatever its date: the account's profile (``app.bsky.actor.profile/self``,
`CURRENT_STATE_KEYS`). It is current state, not history: an account that posts today with a
profile written two years ago must still have a name and an avatar after a 30-day backfill
(issue 9: "every backfilled account has its current profile"). A window download fetches it
with ``getRecord`` when the ``since`` answer lacks it, so a whole download and a window
download keep the same rows.

The cutoff as a rev (`Window.since`): revs are TIDs that sort as text in time order, so a
listRepos entry whose ``rev`` (the repo's latest commit) is at or below `since` wrote
nothing in the window (`Window.dormant`: enumeration does not queue it), and
``getRepo?since=`` asks for the blocks written after the cutoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from firehose.protocol.syntax import (
    MAX_TID_MICROS,
    TID_CLOCK_ID_BITS,
    is_tid,
    make_tid,
    parse_datetime,
    tid_to_datetime,
)

WHOLE_HISTORY_DAYS = -1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CREATED_AT_FIELD = "createdAt"
# (collection, rkey) of records that are an account's current state, kept whatever their date.
CURRENT_STATE_KEYS = frozenset({("app.bsky.actor.profile", "self")})


def _tid_time(rkey: str) -> datetime | None:
    if not is_tid(rkey):
        return None
    try:
        return tid_to_datetime(rkey)
    except (ValueError, OverflowError):  # cannot happen for a valid TID; stay total anyway
        return None


def record_time(rkey: str, record: dict[str, Any] | None) -> datetime | None:
    """The time that decides a record's fate: TID rkey, else ``createdAt``, else None."""
    when = _tid_time(rkey)
    if when is not None:
        return when
    if type(record) is dict:
        created_at = record.get(CREATED_AT_FIELD)
        if type(created_at) is str:
            return parse_datetime(created_at)
    return None


@dataclass(frozen=True)
class Window:
    """Records at or after `cutoff` are kept; ``cutoff=None`` keeps everything."""

    cutoff: datetime | None

    def __post_init__(self) -> None:
        if self.cutoff is not None and self.cutoff.utcoffset() is None:
            # Record times are aware (TIDs are UTC, datetimes carry an offset): a naive
            # cutoff would make every comparison raise TypeError deep inside a download.
            raise ValueError("Window cutoff must be timezone-aware")

    @classmethod
    def from_days(cls, days: int, now: datetime) -> Window:
        """``BACKFILL_DAYS`` -> window. ``-1`` is the whole history; ``0`` keeps nothing
        older than `now` (the backfill is off then, and the caller should not run it)."""
        if days == WHOLE_HISTORY_DAYS:
            return cls(None)
        if days < 0:
            raise ValueError(f"BACKFILL_DAYS must be -1 or >= 0, got {days}")
        return cls(now - timedelta(days=days))

    @property
    def whole_history(self) -> bool:
        return self.cutoff is None

    @property
    def since(self) -> str | None:
        """The ``since`` rev that asks ``com.atproto.sync.getRepo`` for what was written at or
        after the cutoff; None for the whole history.

        The reference PDS sends the blocks whose first-writing rev is ``> since`` (a string
        comparison of TIDs, which sort by time: https://atproto.com/specs/tid), so `since`
        is the greatest TID of the microsecond before the cutoff: every commit at or after
        the cutoff is newer, whatever its clock id. A cutoff before the epoch (impossible
        for a real job) asks for everything, as the smallest TID."""
        if self.cutoff is None:
            return None
        micros = (self.cutoff - _EPOCH) // timedelta(microseconds=1)
        if micros <= 0:
            return make_tid(0, 0)
        return make_tid(min(micros, MAX_TID_MICROS + 1) - 1, (1 << TID_CLOCK_ID_BITS) - 1)

    def rkey_verdict(self, rkey: str) -> bool | None:
        """True/False when a TID rkey decides; None when the rkey is not a TID."""
        if self.cutoff is None:
            return True
        when = _tid_time(rkey)
        if when is None:
            return None
        return when >= self.cutoff

    def keeps(self, rkey: str, record: dict[str, Any] | None, collection: str = "") -> bool:
        """Whether to keep the record: current state (the profile) always, else TID rkey
        time, else ``createdAt``, else kept."""
        if self.cutoff is None or (collection, rkey) in CURRENT_STATE_KEYS:
            return True
        when = record_time(rkey, record)
        return when is None or when >= self.cutoff

    def dormant(self, rev: str | None) -> bool:
        """Whether a repo whose latest commit is `rev` (listRepos' ``rev``) wrote nothing in
        the window: a valid TID at or below `since`, i.e. a commit time before the cutoff
        (TIDs sort as text in time order). No rev, or one that does not parse, is no
        evidence: such a repo is downloaded. Like every TID rule here, this trusts the
        writer's clock and the relay's knowledge of the repo's latest commit."""
        since = self.since
        return since is not None and rev is not None and is_tid(rev) and rev <= since
