"""Dry run (`firehose backfill run --dry-run`, BACKFILL_DRY_RUN=true): fetch and count.

It pages through listRepos and downloads repos exactly as a real run would (same
concurrency limit; dormant repos, whose listRepos rev is older than the cutoff, skipped and
counted as with BACKFILL_SKIP_DORMANT), counts what the window keeps and skips, and writes
nothing at all: no records, no job, no queue rows, no cursor, so a real run afterwards
starts from scratch. It does not enumerate by collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from backfill.download import SkippedRecord
from backfill.jobs import cutoff_for
from backfill.network import LIST_REPOS_PAGE, Network
from backfill.progress import Counts
from backfill.settings import BackfillSettings
from backfill.window import Window

log = logging.getLogger("backfill")


async def dry_run(
    settings: BackfillSettings,
    net: Network,
    stop: asyncio.Event,
    *,
    log_start: Callable[[], None] | None = None,
    max_repos: int | None = None,
) -> dict[str, int]:
    if log_start is not None:
        log_start()
    log.info("[BACKFILL] Dry run: fetching and counting, writing nothing")
    window = Window(cutoff=cutoff_for(settings.days, datetime.now(UTC)))
    since = window.since if settings.since else None
    totals = Counts()
    failed = 0
    repos = 0
    dormant = 0
    slots = asyncio.Semaphore(settings.max_concurrent)

    async def one(did: str) -> None:
        nonlocal failed, repos
        async with slots:
            if stop.is_set():
                return
            try:
                # As the real run downloads: only the window (getRepo?since=) and the profile
                # when that lacks it (docs/backfill-window.md), so the bytes are the run's.
                snap = await net.fetch(did, since=since, want_profile=True)
            except Exception as exc:
                failed += 1
                log.warning("[BACKFILL] Dry run: %s failed: %s", did, exc)
                return
            try:
                for item in snap.items(window):
                    totals.received += 1
                    if isinstance(item, SkippedRecord):
                        totals.skipped += 1
                    else:
                        totals.processed += 1
                totals.bytes += snap.bytes_downloaded
                repos += 1
            finally:
                snap.close()

    seen: set[str] = set()
    async with asyncio.TaskGroup() as tg:
        for did in settings.dids:
            seen.add(did)
            tg.create_task(one(did))
        cursor: str | None = None
        while not stop.is_set():
            try:
                page = await net.list_repos(cursor, LIST_REPOS_PAGE)
            except Exception as exc:
                log.error("[BACKFILL] Dry run: listRepos failed: %s", exc)
                break
            for ref in page.repos:
                if ref.active and settings.skip_dormant and window.dormant(ref.rev):
                    dormant += 1
                    continue
                if (
                    ref.active
                    and ref.did not in seen
                    and (max_repos is None or len(seen) < max_repos)
                ):
                    seen.add(ref.did)
                    tg.create_task(one(ref.did))
            cursor = page.cursor
            if cursor is None:
                break
            # Keep the number of queued tasks bounded by the download rate.
            while len(seen) - repos - failed > LIST_REPOS_PAGE and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
    summary = {
        "repos": repos,
        "repos_failed": failed,
        "repos_skipped_dormant": dormant,
        "records_received": totals.received,
        "records_in_window": totals.processed,
        "records_skipped": totals.skipped,
        "bytes_downloaded": totals.bytes,
    }
    log.info(
        "[BACKFILL] Dry run finished: %d repos (%d failed), %d records received, "
        "%d in the window, %d skipped, %d bytes, %d dormant repos skipped; nothing was written",
        repos, failed, totals.received, totals.processed, totals.skipped, totals.bytes, dormant,
    )  # fmt: skip
    return summary
