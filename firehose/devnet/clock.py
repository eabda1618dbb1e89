"""The generator's virtual clock, with an optional history phase, and record times.

Without history the clock starts at `start_us` and advances 1..40 ms per event. With
history (`history_days` > 0) the first `history_events` events are spread evenly over the
`history_days` before `now_us`: event i falls at a random moment of its own slot
``[start + i * slot, start + (i + 1) * slot)``, so times strictly increase (and so do the
revs and TID record keys derived from them, which the repository spec requires per account)
while looking irregular. The events after that are "live": the clock jumps to `now_us` and
advances 1..40 ms per event again.

`record_time_us` is the backfill's rule for a record's moment: the timestamp of a TID record
key (https://atproto.com/specs/record-key, "tid"), else the record's `createdAt` if it is a
valid RFC 3339 datetime, else None (kept whatever the window).
"""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime
from typing import Any

from firehose.devnet.tid import tid_micros

DAY_US = 86_400_000_000
MAX_EVENT_GAP_US = 40_000  # the clock advances 1..40 ms between events
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# TID syntax (https://atproto.com/specs/tid): 13 base32-sortable chars, top bit zero.
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
# RFC 3339 with a mandatory offset (atproto datetime, https://atproto.com/specs/lexicon#datetime)
_RFC3339_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", re.IGNORECASE
)


def parse_rfc3339_us(text: str) -> int | None:
    """RFC 3339 datetime -> microseconds since the epoch; None if not one."""
    if not _RFC3339_RE.match(text):
        return None
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def wall_now_us() -> int:
    return time.time_ns() // 1000


# The account's profile is current state: the backfill keeps it whatever its date (its
# window rule, backfill/window.py CURRENT_STATE_KEYS), so its moment is None here too.
CURRENT_STATE_PATHS = frozenset({"app.bsky.actor.profile/self"})


def record_time_us(rkey: str, record: dict[str, Any] | None, collection: str = "") -> int | None:
    """The moment the backfill window compares: None for current state (the profile), else
    TID rkey time, else createdAt, else None."""
    if f"{collection}/{rkey}" in CURRENT_STATE_PATHS:
        return None
    if TID_RE.match(rkey):
        return tid_micros(rkey)
    created = record.get("createdAt") if isinstance(record, dict) else None
    return parse_rfc3339_us(created) if isinstance(created, str) else None


class VirtualClock:
    """Event times in microseconds since the epoch; `tick` is called once per event."""

    def __init__(
        self,
        start_us: int,
        *,
        now_us: int | None = None,
        history_days: float = 0.0,
        history_events: int = 0,
    ) -> None:
        self.now_us = wall_now_us() if now_us is None else now_us  # the devnet's "now"
        self.history_events = history_events if history_days > 0 else 0
        if self.history_events:
            span_us = int(history_days * DAY_US)
            self.slot_us = max(1, span_us // self.history_events)
            self.history_start_us = self.now_us - span_us
            self.current_us = self.history_start_us
        else:
            self.slot_us = 0
            self.history_start_us = start_us
            self.current_us = start_us
        self.events = 0

    def tick(self, rng: random.Random) -> int:
        """Advance to the next event's moment and return it."""
        self.events += 1
        if self.events <= self.history_events:
            slot_start = self.history_start_us + (self.events - 1) * self.slot_us
            self.current_us = slot_start + rng.randrange(self.slot_us)
        elif self.history_events and self.events == self.history_events + 1:
            self.current_us = max(self.now_us, self.current_us) + rng.randint(1, MAX_EVENT_GAP_US)
        else:
            self.current_us += rng.randint(1, MAX_EVENT_GAP_US)
        return self.current_us
