"""Prometheus metrics of the live path, built on a registry that is passed in.

Tests build a fresh `CollectorRegistry` per worker, so counts never leak between them.
Every label takes values from a bounded set: event types from the lexicon, actions, the
decoder's fixed error reasons, reconnect reasons named here. Help text says how an operator
reads the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from firehose.storage.queries import TYPED_TABLES

# Event types named by com.atproto.sync.subscribeRepos, plus legacy ones and "other".
EVENT_TYPES = (
    "commit",
    "sync",
    "identity",
    "account",
    "info",
    "error",
    "handle",
    "migrate",
    "tombstone",
    "other",
)
# The `collection` label of firehose_ops_total: the typed tables' collections by name, every
# other NSID (custom lexicons are unbounded) as `other`, so the label set stays bounded.
OPS_COLLECTIONS = frozenset(TYPED_TABLES)


def ops_collection_label(collection: str) -> str:
    return collection if collection in OPS_COLLECTIONS else "other"


RECONNECT_REASONS = ("closed", "idle", "error", "consumer_too_slow", "future_cursor", "refused")

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


@dataclass(frozen=True)
class LiveMetrics:
    events: Counter
    ops: Counter
    invalid: Counter
    sanitized: Counter
    cursor: Gauge
    lag_seconds: Gauge
    batch_seconds: Histogram
    batch_events: Histogram
    commit_latency: Histogram
    queue_depth: Gauge
    connected: Gauge
    reconnects: Counter
    seq_anomalies: Counter
    db_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LiveMetrics:
        _register_process_metrics(registry)
        return cls(
            events=Counter(
                "firehose_events_total",
                "Firehose events read from the relay, by type. rate() is the live event rate.",
                ["type"],
                registry=registry,
            ),
            ops=Counter(
                "firehose_ops_total",
                "Record operations committed to PostgreSQL, by action (create/update/delete) "
                "and collection (the Bluesky app's; any other NSID counts as `other`).",
                ["action", "collection"],
                registry=registry,
            ),
            invalid=Counter(
                "firehose_invalid_total",
                "Malformed frames or ops counted and skipped, by reason. Non-zero is hostile or "
                "buggy input upstream; the worker keeps going.",
                ["reason"],
                registry=registry,
            ),
            sanitized=Counter(
                "firehose_records_sanitized_total",
                "Records indexed with NUL characters replaced by U+FFFD (PostgreSQL cannot "
                "store NUL). They are indexed, not dropped.",
                registry=registry,
            ),
            cursor=Gauge(
                "firehose_cursor",
                "Last relay seq committed to PostgreSQL together with its rows. Flat while "
                "events arrive means the writer is stuck.",
                registry=registry,
            ),
            lag_seconds=Gauge(
                "firehose_lag_seconds",
                "Now minus the relay time of the last committed event. Growing lag means the "
                "worker is slower than the network.",
                registry=registry,
            ),
            batch_seconds=Histogram(
                "firehose_batch_commit_seconds",
                "Time to apply one batch in one transaction (COPY, upserts, cursor).",
                buckets=_LATENCY_BUCKETS_S,
                registry=registry,
            ),
            batch_events=Histogram(
                "firehose_batch_events",
                "Events per committed batch. Large batches mean the worker is catching up.",
                buckets=_BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
            commit_latency=Histogram(
                "firehose_event_commit_latency_seconds",
                "Time from reading an event off the socket to its transaction committing "
                "(the oldest event of each batch). High values: the database is behind.",
                buckets=_LATENCY_BUCKETS_S,
                registry=registry,
            ),
            queue_depth=Gauge(
                "firehose_queue_depth",
                "Frames read from the socket but not yet committed. Near its bound means the "
                "database is the bottleneck and the socket is being slowed (back-pressure).",
                registry=registry,
            ),
            connected=Gauge(
                "firehose_relay_connected",
                "1 while the websocket to the relay is open.",
                registry=registry,
            ),
            reconnects=Counter(
                "firehose_reconnects_total",
                "Reconnections to the relay, by reason. A steady rate means an unstable link.",
                ["reason"],
                registry=registry,
            ),
            seq_anomalies=Counter(
                "firehose_seq_anomalies_total",
                "Relay seq anomalies by kind: backwards (event dropped: seq must grow on a "
                "connection), gap (seq jumped forward), outdated_cursor (the relay no longer had "
                "our events), future_cursor (the relay's seq was reset: resumed from its tip), "
                "reset (a new, lower seq space at a connection's start).",
                ["kind"],
                registry=registry,
            ),
            db_errors=Counter(
                "firehose_db_errors_total",
                "Database errors while committing a batch; the batch is retried.",
                registry=registry,
            ),
        )


# Decoded event classes (firehose.model) by the `type` label of firehose_events_total.
_EVENT_TYPE_LABELS = {
    "CommitEvent": "commit",
    "SyncEvent": "sync",
    "IdentityEvent": "identity",
    "AccountEvent": "account",
    "InfoEvent": "info",
    "ErrorFrame": "error",
}


class LiveTally:
    """The live path's per-event counts, kept off Prometheus's locks on the hot path.

    A counter's inc() takes a lock (timeit: 0.5-0.8 µs a call against 0.1-0.2 µs for a dict
    update), so the reader counts the events it decodes by type name in `decoded`, and
    `flush()` moves them into firehose_events_total at every commit and when the reader stops.
    Labelled children are built once: labels() costs a lock and a dict lookup."""

    def __init__(self, metrics: LiveMetrics) -> None:
        # Decoded events by type name (a class name, or a legacy type's name on the wire).
        self.decoded: dict[str, int] = {}
        self._events = {
            name: metrics.events.labels(label) for name, label in _EVENT_TYPE_LABELS.items()
        }
        self._other_events = metrics.events.labels("other")
        self._invalid_metric = metrics.invalid
        self._invalid: dict[str, Any] = {}

    def flush(self) -> None:
        """Move the events decoded so far into firehose_events_total."""
        counts, self.decoded = self.decoded, {}
        for name, n in counts.items():
            self._events.get(name, self._other_events).inc(n)

    def invalid(self, reason: str) -> Any:
        """firehose_invalid_total's child for `reason` (reasons come from a fixed set)."""
        counter = self._invalid.get(reason)
        if counter is None:
            counter = self._invalid[reason] = self._invalid_metric.labels(reason)
        return counter


def _register_process_metrics(registry: CollectorRegistry) -> None:
    """process_* (CPU seconds, resident memory, open fds, start time), python_info and
    python_gc_* on the worker's own registry: prometheus_client puts them only on its global
    default registry, which the worker does not serve."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    if GC_COLLECTOR is not None:
        GCCollector(registry=registry)
