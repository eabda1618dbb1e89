"""The gate: decoded events are screened, in firehose order, before they are batched.

Each step (`Screen`) looks at one collected slice of the stream and writes into a shared
`Verdict`: which events to drop (with a reason) and which repos to resync (with a reason).
Steps run in order and see the verdict of the previous ones; a step must skip events that
are already dropped. The order matters: signature verification (`VERIFY_SIGNATURES`)
comes before the repo chain checks of sync 1.1, so a forged commit never moves the chain
state that the next genuine commit is compared with.

Invariants kept here:
  * a dropped event still moves the cursor: it was read and judged, and a replay would be
    judged the same way (BatchBuilder.skip);
  * resync requests travel inside the batch and are saved in the same transaction as the
    cursor that passes the event that caused them (DESIGN.md invariant 1), so a crash can
    neither lose a request nor save one for an event that will be read again;
  * label values are bounded: reasons come from DROP_REASONS / RESYNC_REASONS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from firehose.model import Event

# Why an event is dropped (firehose_events_dropped_total{reason}).
DROP_REASONS = (
    "bad_signature",  # the commit's signature does not verify against the repo's key
    "identity_unavailable",  # the repo's DID document could not be resolved to check it
    "rev_not_newer",  # sync 1.1: a commit whose rev is not above the repo's stored rev
    "account_inactive",  # a commit from an account that is deactivated/takendown/...
)
# Why a repo is queued for a resync through the backfill path (firehose_resyncs_requested_total).
RESYNC_REASONS = (
    "bad_signature",
    "identity_unavailable",
    "prev_data_mismatch",  # sync 1.1: prevData is not the stored MST root of the repo
    "since_mismatch",  # sync 1.1: since is not the stored rev of the repo
    "sync_event",  # a #sync event: the repo's state was reset by its host
    "account_inactive",  # a commit from an account we hold inactive: a missed reactivation?
)


@dataclass(slots=True)
class Verdict:
    """What the steps decided about one slice: indexes into it, and dids."""

    dropped: dict[int, str] = field(default_factory=dict)  # index -> drop reason
    resyncs: dict[str, str] = field(default_factory=dict)  # did -> resync reason (first wins)

    def drop(self, index: int, reason: str) -> None:
        self.dropped.setdefault(index, reason)

    def resync(self, did: str, reason: str) -> None:
        self.resyncs.setdefault(did, reason)


class Screen(Protocol):
    """One step of the gate. It may await I/O (identity lookups, stored repo heads)."""

    async def screen(self, events: Sequence[Event], verdict: Verdict) -> None: ...


@dataclass(frozen=True)
class GateMetrics:
    dropped: Counter
    resyncs: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GateMetrics:
        return cls(
            dropped=Counter(
                "firehose_events_dropped_total",
                "Events read but refused by the gate, by reason (bad_signature, "
                "identity_unavailable, rev_not_newer, account_inactive). Any rise of "
                "bad_signature means forged or corrupted commits reached this worker.",
                ["reason"],
                registry=registry,
            ),
            resyncs=Counter(
                "firehose_resyncs_requested_total",
                "Repos queued for a resync from their PDS (getRepo), by reason. A steady "
                "trickle of prev_data_mismatch is normal after a reconnect gap; a flood "
                "means the relay is losing events.",
                ["reason"],
                registry=registry,
            ),
        )


class Gate:
    def __init__(self, screens: Sequence[Screen], metrics: GateMetrics) -> None:
        self._screens = tuple(screens)
        self._metrics = metrics

    async def screen(self, events: Sequence[Event]) -> Verdict:
        verdict = Verdict()
        for step in self._screens:
            await step.screen(events, verdict)
        for reason in verdict.dropped.values():
            self._metrics.dropped.labels(reason).inc()
        for reason in verdict.resyncs.values():
            self._metrics.resyncs.labels(reason).inc()
        return verdict
