"""Prometheus metrics of the backfill, on a registry passed in.

Labels take values from fixed sets only: repo states, record stages, throttle reasons, job
statuses, enumeration skip reasons and methods, and the network side's bounded failure
reasons. Help text says how to read each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from backfill.window_metrics import WindowMetrics

if TYPE_CHECKING:
    from backfill.progress import Counts

REPO_STATES = ("pending", "in_progress", "done", "failed")
RECORD_STAGES = ("received", "processed", "skipped")
THROTTLE_REASONS = ("memory", "idle", "rate_limit", "paused")
JOB_STATUSES = ("running", "paused", "paused_rate_limited", "completed", "failed")
SKIP_REASONS = ("dormant", "inactive", "invalid")
LIST_METHODS = ("listRepos", "listReposByCollection")
_FETCH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class BackfillMetrics:
    repos: Gauge
    records: Counter
    bytes_downloaded: Counter
    fetch_seconds: Histogram
    repo_failures: Counter
    rate_limit_pauses: Counter
    throttled: Gauge
    rss_bytes: Gauge
    memory_limit_bytes: Gauge
    job_status: Gauge
    progress_ratio: Gauge
    eta_seconds: Gauge
    window: WindowMetrics  # getRepo?since= and profile fetches (backfill/window_metrics.py)
    repos_skipped: Counter
    enumeration_pages: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BackfillMetrics:
        m = cls(
            repos=Gauge(
                "backfill_repos",
                "Repos of the current backfill job by queue state (all processes). done+failed "
                "over the sum is the job's progress; in_progress is bounded by "
                "BACKFILL_MAX_CONCURRENT per process.",
                ["state"],
                registry=registry,
            ),
            records=Counter(
                "backfill_records_total",
                "Records by stage, this process and its helper processes (BACKFILL_PROCESSES): "
                "received = read from repos, processed = "
                "written, skipped = outside the window, filtered or invalid. rate(received) "
                "is the backfill speed.",
                ["stage"],
                registry=registry,
            ),
            bytes_downloaded=Counter(
                "backfill_bytes_downloaded_total",
                "Bytes of repo CARs downloaded (getRepo), this process and its helpers.",
                registry=registry,
            ),
            fetch_seconds=Histogram(
                "backfill_fetch_seconds",
                "Time to resolve and download one repo. A growing tail means slow or "
                "rate-limited PDSes.",
                buckets=_FETCH_BUCKETS_S,
                registry=registry,
            ),
            repo_failures=Counter(
                "backfill_repo_failures_total",
                "Failed repo attempts by reason (retried with backoff until "
                "BACKFILL_MAX_ATTEMPTS, then the repo is failed and the backfill goes on).",
                ["reason"],
                registry=registry,
            ),
            rate_limit_pauses=Counter(
                "backfill_rate_limit_pauses_total",
                "429 responses that paused a host. A steady rate: lower BACKFILL_MAX_CONCURRENT.",
                registry=registry,
            ),
            throttled=Gauge(
                "backfill_throttled",
                "1 while the backfill holds back for this reason: memory (RSS near "
                "BACKFILL_MAX_MEMORY_MB), idle (live stream behind), rate_limit (every host "
                "paused by 429s), paused (firehose backfill pause).",
                ["reason"],
                registry=registry,
            ),
            rss_bytes=Gauge(
                "backfill_process_rss_bytes",
                "Resident memory of the worker process, as the memory throttle measures it.",
                registry=registry,
            ),
            memory_limit_bytes=Gauge(
                "backfill_memory_limit_bytes",
                "This process's part of BACKFILL_MAX_MEMORY_MB in bytes (all of it unless "
                "BACKFILL_PROCESSES > 1); the backfill pauses above 90% of it.",
                registry=registry,
            ),
            job_status=Gauge(
                "backfill_job_status",
                "1 for the current job's status, 0 for the others.",
                ["status"],
                registry=registry,
            ),
            progress_ratio=Gauge(
                "backfill_job_progress_ratio",
                "Finished (done + failed) repos over repos enumerated so far, 0..1. It can "
                "drop while enumeration still adds repos.",
                registry=registry,
            ),
            eta_seconds=Gauge(
                "backfill_job_eta_seconds",
                "Estimated seconds until the job completes at the current repo rate; -1 while "
                "unknown (enumeration unfinished or no rate yet).",
                registry=registry,
            ),
            window=WindowMetrics.create(registry),
            repos_skipped=Counter(
                "backfill_repos_skipped_total",
                "Repos the relay listed that enumeration did not queue, this process, by "
                "reason: dormant = latest commit (listRepos rev) older than the job's cutoff, "
                "so nothing to fetch in the window (BACKFILL_SKIP_DORMANT); inactive = "
                "account deactivated, taken down or suspended; invalid = malformed entry. "
                "Why the queue is shorter than the relay's list; the job's dormant total is "
                "in `firehose backfill status`.",
                ["reason"],
                registry=registry,
            ),
            enumeration_pages=Counter(
                "backfill_enumeration_pages_total",
                "Enumeration pages read from the relay, this process, by method: "
                "listReposByCollection while WANTED_COLLECTIONS lists exact NSIDs (only the "
                "repos holding them), else listRepos (every repo).",
                ["method"],
                registry=registry,
            ),
        )
        for reason in SKIP_REASONS:
            m.repos_skipped.labels(reason)
        for method in LIST_METHODS:
            m.enumeration_pages.labels(method)
        for state in REPO_STATES:
            m.repos.labels(state)
        for stage in RECORD_STAGES:
            m.records.labels(stage)
        for reason in THROTTLE_REASONS:
            m.throttled.labels(reason)
        for status in JOB_STATUSES:
            m.job_status.labels(status)
        m.eta_seconds.set(-1)
        return m

    def count_records(self, counts: Counts) -> None:
        """Add `counts` (this process's repos, or a helper's report) to backfill_records_total."""
        self.records.labels("received").inc(counts.received)
        self.records.labels("processed").inc(counts.processed)
        self.records.labels("skipped").inc(counts.skipped)

    def set_throttle(self, state: dict[str, bool]) -> None:
        for reason, holds in state.items():
            self.throttled.labels(reason).set(1 if holds else 0)

    def set_status(self, status: str) -> None:
        for s in JOB_STATUSES:
            self.job_status.labels(s).set(1 if s == status else 0)
