"""Repo enumeration: listRepos (1,000 repos a page) or listReposByCollection (2,000 a page).

One process at a time pages through the relay (a lease on the job row); each page's new
repos, the enumeration state (method, NSID pass, the relay's opaque cursor: sql/006) and
the page ordinal (the `backfill` row of firehose_cursor, a bigint) are saved in one
transaction, so a restart continues after the last saved page and never loses or doubles
one. Which method and which pass come next is decided by backfill/enum_plan.py (PURE).

What is not queued, and why (counted in the metric backfill_repos_skipped_total):

* inactive repos (deactivated, taken down, ...): there is nothing to download;
* dormant repos (BACKFILL_SKIP_DORMANT, a job with a cutoff): the listRepos entry's ``rev``
  is the repo's latest commit; at or below the cutoff's rev (`Window.dormant`) the repo
  wrote nothing in the window. Counted in the job row (`repos_skipped_dormant`) in the
  page's transaction. listReposByCollection entries carry no rev: they are all queued;
* malformed entries (relay_http.parse_page drops them).

A relay that does not implement listReposByCollection (404, 501, ``MethodNotImplemented``)
makes the job fall back to listRepos from the start, logged once and saved in the job row
(`list_method`, `list_fallback`), so neither this process nor a restart asks again.
"""

from __future__ import annotations

import logging
from typing import Any

from backfill import queries, queue
from backfill.context import Context, Halted
from backfill.enum_plan import (
    BY_COLLECTION,
    LIST_REPOS,
    EnumState,
    Step,
    after_page,
    collection_passes,
    next_step,
)
from backfill.network import LIST_REPOS_BY_COLLECTION_PAGE, LIST_REPOS_PAGE, RepoPage
from backfill.queue import backoff_s
from backfill.relay_http import not_implemented
from backfill.window import Window
from firehose.storage.writer import save_cursor

log = logging.getLogger("backfill")

ENUM_LEASE_S = 60.0
ENUM_WAIT_S = 5.0  # another process holds the enumeration lease: check back this often
CURSOR_SERVICE = "backfill"


async def enumerate_repos(ctx: Context) -> None:
    """Page through the relay until enumeration is done, or the backfill stops."""
    passes = collection_passes(ctx.wanted_collections, ctx.settings.by_collection)
    window = Window(ctx.job.cutoff) if ctx.settings.skip_dormant else Window(None)
    announced: set[str] = set()
    failures = 0
    try:
        while not ctx.halt.is_set():
            if ctx.throttle.paused:
                await ctx.sleep(1.0)
                continue
            async with ctx.conn() as conn:
                claim = await conn.fetchrow(
                    queries.ENUM_CLAIM, ctx.job.id, ctx.owner, ENUM_LEASE_S, ctx.dead_owners
                )
                if claim is None:
                    done = await conn.fetchval(queries.ENUM_DONE, ctx.job.id)
            if claim is None:
                if done:
                    return
                await ctx.sleep(ENUM_WAIT_S)
                continue
            state = EnumState(
                claim["list_method"],
                claim["list_collection"],
                claim["list_cursor"],
                tuple(claim["list_collections_done"] or ()),
            )
            step = next_step(state, passes)
            if step is None:
                await _finish(ctx, state)
                return
            _announce(ctx, state, step, passes, window, announced)
            try:
                page = await ctx.until_halt(_fetch(ctx, step))
            except Halted:
                raise
            except Exception as exc:
                reason = not_implemented(exc) if step.method == BY_COLLECTION else None
                if reason is not None:
                    await _fall_back(ctx, state, reason)
                    failures = 0
                    continue
                failures += 1
                transient = getattr(exc, "transient", True)
                if not transient or failures >= ctx.settings.max_attempts:
                    log.error("[BACKFILL] %s failed for good: %s", step.method, exc)
                    async with ctx.conn() as conn:
                        await conn.execute(
                            queries.JOB_FAIL, ctx.job.id, f"{step.method} failed: {exc}"[:1000]
                        )
                    return
                delay = getattr(exc, "retry_after_s", None) or backoff_s(failures)
                log.warning("[BACKFILL] %s failed (retry in %.0fs): %s", step.method, delay, exc)
                await ctx.sleep(delay)
                continue
            failures = 0
            await _save_page(ctx, state, step, page, passes, window)
    except Halted:
        return


async def _fetch(ctx: Context, step: Step) -> RepoPage:
    if step.method == BY_COLLECTION and step.collection is not None:
        return await ctx.network.list_repos_by_collection(
            step.collection, step.cursor, LIST_REPOS_BY_COLLECTION_PAGE
        )
    return await ctx.network.list_repos(step.cursor, LIST_REPOS_PAGE)


def _announce(
    ctx: Context,
    state: EnumState,
    step: Step,
    passes: tuple[str, ...],
    window: Window,
    announced: set[str],
) -> None:
    """One line per process and method saying how repos are enumerated, and why."""
    if step.method in announced:
        return
    announced.add(step.method)
    if step.method == BY_COLLECTION:
        log.info(
            "[BACKFILL] Enumerating repos by collection (com.atproto.sync.listReposByCollection,"
            " one pass per WANTED_COLLECTIONS entry): %s",
            ", ".join(passes),
        )
        return
    if state.method == BY_COLLECTION:
        log.info(
            "[BACKFILL] WANTED_COLLECTIONS / BACKFILL_BY_COLLECTION no longer allow "
            "listReposByCollection: enumerating with listRepos from the start"
        )
    if window.since is not None:
        log.info(
            "[BACKFILL] Repos whose latest commit (listRepos rev) is older than %s are "
            "skipped as dormant (BACKFILL_SKIP_DORMANT=true)",
            window.cutoff.isoformat(timespec="seconds") if window.cutoff else "",
        )


async def _save_page(
    ctx: Context,
    state: EnumState,
    step: Step,
    page: RepoPage,
    passes: tuple[str, ...],
    window: Window,
) -> None:
    repos = page.repos
    active = [r for r in repos if r.active]
    dids = [r.did for r in active if not window.dormant(r.rev)]
    dormant = len(active) - len(dids)
    new, finished = after_page(step, page.cursor, passes, state.done)
    async with ctx.conn() as conn, conn.transaction():
        inserted = await queue.enqueue(conn, ctx.job.id, dids, queue.PRIORITY_ENUMERATED)
        row = await conn.fetchrow(
            queries.ENUM_ADVANCE,
            ctx.job.id,
            ctx.owner,
            *(state.method, state.collection, state.cursor),
            *(new.method, new.collection, new.cursor, list(new.done)),
            finished,
            dormant,
            ENUM_LEASE_S,
        )
        if row is None:
            # Our lease was taken over meanwhile: undo, the new owner pages on.
            raise _LostLease
        await save_cursor(conn, CURSOR_SERVICE, row["list_pages"], None)
    ctx.queued.set()
    m = ctx.metrics
    m.enumeration_pages.labels(step.method).inc()
    m.repos_skipped.labels("dormant").inc(dormant)
    m.repos_skipped.labels("inactive").inc(len(repos) - len(active))
    m.repos_skipped.labels("invalid").inc(page.invalid)
    log.debug(
        "%s page %d%s: %d repos, %d new, %d inactive, %d dormant skipped",
        step.method,
        row["list_pages"],
        f" ({step.collection})" if step.collection else "",
        len(repos),
        inserted,
        len(repos) - len(active),
        dormant,
    )
    if step.method == BY_COLLECTION and page.cursor is None:
        log.info("[BACKFILL] listReposByCollection pass %s finished", step.collection)
    if finished:
        _log_finished(row, new)


def _log_finished(row: Any, state: EnumState) -> None:
    how = (
        f"listReposByCollection, {len(state.done)} collection(s)"
        if state.method == BY_COLLECTION
        else "listRepos"
    )
    log.info(
        "[BACKFILL] Repo enumeration finished: %d pages (%s); %d repos queued, "
        "%d dormant repos skipped",
        row["list_pages"],
        how,
        row["repos_total"],
        row["repos_skipped_dormant"],
    )


async def _fall_back(ctx: Context, state: EnumState, reason: str) -> None:
    async with ctx.conn() as conn:
        row = await conn.fetchrow(
            queries.ENUM_FALLBACK,
            ctx.job.id,
            ctx.owner,
            *(state.method, state.collection, state.cursor),
            f"listReposByCollection: {reason}",
        )
    if row is None:
        raise _LostLease
    log.warning(
        "[BACKFILL] The relay does not implement com.atproto.sync.listReposByCollection "
        "(%s): enumerating with listRepos instead; this job will not ask again",
        reason,
    )


async def _finish(ctx: Context, state: EnumState) -> None:
    async with ctx.conn() as conn:
        row = await conn.fetchrow(
            queries.ENUM_FINISH,
            ctx.job.id,
            ctx.owner,
            *(state.method, state.collection, state.cursor),
        )
    if row is None:
        raise _LostLease
    log.info("[BACKFILL] Repo enumeration finished: %d pages", row["list_pages"])


class _LostLease(Exception):
    pass


async def enumerate_until_done(ctx: Context) -> None:
    while True:
        try:
            await enumerate_repos(ctx)
            return
        except _LostLease:
            continue


__all__ = ["BY_COLLECTION", "LIST_REPOS", "enumerate_repos", "enumerate_until_done"]
