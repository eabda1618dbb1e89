"""Repo enumeration: com.atproto.sync.listRepos on the relay, 1,000 repos per page.

One process at a time pages through the relay (a lease on the job row); each page's new
repos, the relay's opaque cursor (in the job row) and the page ordinal (the `backfill` row
of firehose_cursor, a bigint) are saved in one transaction, so a restart continues after
the last saved page and never loses or doubles one. Inactive repos (deactivated, taken
down, ...) are skipped: there is nothing to download.
"""

from __future__ import annotations

import logging

from backfill import queries, queue
from backfill.context import Context, Halted
from backfill.network import LIST_REPOS_PAGE
from backfill.queue import backoff_s
from firehose.storage.writer import save_cursor

log = logging.getLogger("backfill")

ENUM_LEASE_S = 60.0
ENUM_WAIT_S = 5.0  # another process holds the enumeration lease: check back this often
CURSOR_SERVICE = "backfill"


async def enumerate_repos(ctx: Context) -> None:
    """Page through listRepos until the relay says there is no more, or the backfill stops."""
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
            try:
                page = await ctx.until_halt(ctx.network.list_repos(claim[0], LIST_REPOS_PAGE))
            except Halted:
                raise
            except Exception as exc:
                failures += 1
                transient = getattr(exc, "transient", True)
                if not transient or failures >= ctx.settings.max_attempts:
                    log.error("[BACKFILL] listRepos failed for good: %s", exc)
                    async with ctx.conn() as conn:
                        await conn.execute(
                            queries.JOB_FAIL, ctx.job.id, f"listRepos failed: {exc}"[:1000]
                        )
                    return
                delay = getattr(exc, "retry_after_s", None) or backoff_s(failures)
                log.warning("[BACKFILL] listRepos failed (retry in %.0fs): %s", delay, exc)
                await ctx.sleep(delay)
                continue
            failures = 0
            await _save_page(ctx, claim[0], page)
    except Halted:
        return


async def _save_page(ctx: Context, cursor: str | None, page: object) -> None:
    repos = getattr(page, "repos", [])
    next_cursor = getattr(page, "cursor", None)
    dids = [r.did for r in repos if r.active]
    async with ctx.conn() as conn, conn.transaction():
        inserted = await queue.enqueue(conn, ctx.job.id, dids, queue.PRIORITY_ENUMERATED)
        pages = await conn.fetchval(
            queries.ENUM_ADVANCE,
            ctx.job.id,
            ctx.owner,
            cursor,
            next_cursor,
            next_cursor is None,
            0,  # repos_total already grew by `inserted` in enqueue
            ENUM_LEASE_S,
        )
        if pages is None:
            # Our lease was taken over meanwhile: undo, the new owner pages on.
            raise _LostLease
        await save_cursor(conn, CURSOR_SERVICE, pages, None)
    log.debug(
        "listRepos page %d: %d repos, %d new, %d inactive skipped",
        pages,
        len(repos),
        inserted,
        len(repos) - len(dids),
    )
    if next_cursor is None:
        log.info("[BACKFILL] Repo enumeration finished: %d pages", pages)


class _LostLease(Exception):
    pass


async def enumerate_until_done(ctx: Context) -> None:
    while True:
        try:
            await enumerate_repos(ctx)
            return
        except _LostLease:
            continue
