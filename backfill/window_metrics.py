"""Prometheus metrics of window downloads (``getRepo?since=``, getRecord of profiles).

Labels come from fixed sets (`backfill.since.DOWNLOAD_KINDS`, `FALLBACK_REASONS`,
`backfill.window_fetch.PROFILE_OUTCOMES`); docs/backfill-window.md explains how to read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from backfill.network import Snapshot
from backfill.since import DOWNLOAD_KINDS, FALLBACK_REASONS
from backfill.window_fetch import PROFILE_OUTCOMES


@dataclass(frozen=True)
class WindowMetrics:
    downloads: Counter
    fallbacks: Counter
    absent_blocks: Counter
    profile_fetches: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WindowMetrics:
        m = cls(
            downloads=Counter(
                "backfill_window_downloads_total",
                "Repos downloaded, by what getRepo answered: whole (asked without since: "
                "BACKFILL_DAYS=-1, BACKFILL_SINCE=false, or a fallback), since_partial (only "
                "what was written in the window: the saving), since_whole_answer (asked with "
                "since, got a complete tree: a PDS that ignores since, or a repo entirely "
                "written in the window), since_empty (nothing written in the window).",
                ["kind"],
                registry=registry,
            ),
            fallbacks=Counter(
                "backfill_since_fallbacks_total",
                "since answers that lacked a block newer than since (a truncated or "
                "non-conforming answer), by evidence; each repo was downloaded again whole, "
                "so nothing was lost. A steady rate points at one PDS: compare with "
                "backfill_repo_failures_total.",
                ["reason"],
                registry=registry,
            ),
            absent_blocks=Counter(
                "backfill_since_absent_blocks_total",
                "Blocks a since answer left out because they are older than the window, "
                "skipped without downloading: subtree (an MST subtree) or record.",
                ["what"],
                registry=registry,
            ),
            profile_fetches=Counter(
                "backfill_profile_fetches_total",
                "Profiles (app.bsky.actor.profile/self) fetched with getRecord because a since "
                "answer did not carry them, by result: found (written), absent (the account "
                "has none), error (a malformed or tampered proof: profile not written, see "
                "the warning log; transient failures retry the repo instead).",
                ["result"],
                registry=registry,
            ),
        )
        for kind in DOWNLOAD_KINDS:
            m.downloads.labels(kind)
        for reason in FALLBACK_REASONS:
            m.fallbacks.labels(reason)
        for what in ("subtree", "record"):
            m.absent_blocks.labels(what)
        for result in PROFILE_OUTCOMES:
            m.profile_fetches.labels(result)
        return m

    def count(self, snap: Snapshot) -> None:
        """Count one downloaded snapshot."""
        self.downloads.labels(snap.kind).inc()
        if snap.since_fallback:
            self.fallbacks.labels(snap.since_fallback).inc()
        self.absent_blocks.labels("subtree").inc(snap.absent_subtrees)
        self.absent_blocks.labels("record").inc(snap.absent_records)
        if snap.profile_fetch:
            self.profile_fetches.labels(snap.profile_fetch).inc()
