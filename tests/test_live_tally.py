"""metrics.LiveTally: the reader's per-event counts reach firehose_events_total only when
flushed (at every commit and when the reader stops), by the `type` label, and invalid input
is counted under its reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from firehose.metrics import LiveMetrics, LiveTally


def _events(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["type"]: s.value
        for metric in registry.collect()
        if metric.name == "firehose_events"
        for s in metric.samples
        if s.name == "firehose_events_total"
    }


def test_decoded_events_reach_the_counter_when_flushed() -> None:
    registry = CollectorRegistry()
    tally = LiveTally(LiveMetrics.create(registry))
    tally.decoded["CommitEvent"] = 3
    tally.decoded["IdentityEvent"] = 1
    tally.decoded["handle"] = 2  # a legacy type, counted under its wire name
    assert _events(registry).get("commit", 0) == 0  # nothing before the flush
    tally.flush()
    counts = _events(registry)
    assert counts["commit"] == 3
    assert counts["identity"] == 1
    assert counts["other"] == 2  # no label of its own: the label set stays bounded
    assert tally.decoded == {}
    tally.decoded["CommitEvent"] = 2
    tally.flush()
    tally.flush()  # an empty flush adds nothing
    assert _events(registry)["commit"] == 5


def test_invalid_counts_by_reason() -> None:
    registry = CollectorRegistry()
    tally = LiveTally(LiveMetrics.create(registry))
    tally.invalid("too_large").inc()
    tally.invalid("too_large").inc(2)
    tally.invalid("refused").inc()
    assert registry.get_sample_value("firehose_invalid_total", {"reason": "too_large"}) == 3
    assert registry.get_sample_value("firehose_invalid_total", {"reason": "refused"}) == 1
