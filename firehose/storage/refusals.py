"""The parts of a live batch PostgreSQL refuses, found by probes rolled back.

rows.py keeps hostile record content storable (wrong types become NULL, identifiers too long
to index are dropped and counted, NULs replaced), and the decoder checks every identifier's
syntax. This is the fallback for what that screening did not foresee. A live batch's statement
that raises one of `snapshots.REFUSED` (a constraint, a value PostgreSQL cannot store, an index
entry over btree's limit) fails the same way on every retry, since the data decides it: without
this, one such event would stop the stream for good, its batch retried forever.

`find_refused` bisects the parts the writer applies (the batch's writes, identities,
accounts, heads and resync requests, less those it passes over: `parts_of`) with probes:
the writer's own statements for a subset of them, in a transaction that is always rolled
back. It returns the parts refused on their own; `without` gives the batch less exactly
those, with its cursor, for the worker to commit, count and log. A refusal that only a
combination of parts causes, or that a retry no longer meets (a concurrent writer's row),
isolates nothing: the caller retries the whole batch as for any other error.

Invariant: a probe never commits. Cost: about 2·k·log2(n) probes for k refused parts among n,
each a small rolled-back transaction; nothing at all while no row is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from firehose.model import Batch
from firehose.storage import prepare, writer
from firehose.storage.snapshots import REFUSED

# The Batch fields a probe bisects, each a list of independent parts.
PART_FIELDS = ("writes", "identities", "accounts", "heads", "resyncs")


@dataclass(frozen=True, slots=True)
class Refused:
    """One part of a batch that PostgreSQL refused on its own, and its error."""

    field: str  # one of PART_FIELDS
    part: Any
    error: Exception

    def describe(self) -> str:
        """What the part was, for the log: which repo, which record or event."""
        p = self.part
        if self.field == "writes":
            return f"{p.action} of {p.uri} at rev {p.rev}"
        if self.field == "identities":
            return f"identity event of {p.did} at seq {p.seq}"
        if self.field == "accounts":
            return f"account event of {p.did} at seq {p.seq}"
        if self.field == "heads":
            return f"head of {p[0]} at rev {p[1]}"
        return f"resync request for {p[0]} ({p[1]})"


def parts_of(batch: Batch) -> list[tuple[str, Any]]:
    """The parts the writer applies, in field order and, within a field, in the batch's
    order. Not those it passes over, which cannot be what PostgreSQL refuses: a write that a
    later one of the same uri supersedes or that rows.py found unstorable
    (prepare.applied_writes, the writer's own selection),
    an identity or account event followed by another of the same did (prepare.last_per_did),
    a head below another of its repo (prepare.latest_heads), a resync request after the first
    of its repo. Probed alone, such a part could be refused and then counted although it was
    never going to be written."""
    first_resyncs: dict[str, tuple[str, str]] = {}
    for request in batch.resyncs:
        first_resyncs.setdefault(request[0], request)
    applied = {
        id(part)
        for part in (
            *prepare.applied_writes(batch.writes).values(),
            *prepare.last_per_did(batch.identities),
            *prepare.last_per_did(batch.accounts),
            *prepare.latest_heads(batch.heads),
            *first_resyncs.values(),
        )
    }
    return [
        (name, part) for name in PART_FIELDS for part in getattr(batch, name) if id(part) in applied
    ]


def probe_batch(parts: Iterable[tuple[str, Any]]) -> Batch:
    """A batch of these parts alone: no cursor, no events."""
    fields: dict[str, Any] = {name: [] for name in PART_FIELDS}
    for name, part in parts:
        fields[name].append(part)
    return Batch(**fields)


def without(batch: Batch, refused: Iterable[Refused]) -> Batch:
    """`batch` less the refused parts (by identity), with its cursor and counts."""
    gone = {id(r.part) for r in refused}
    kept: dict[str, Any] = {
        name: [p for p in getattr(batch, name) if id(p) not in gone] for name in PART_FIELDS
    }
    return replace(batch, **kept)


async def find_refused(conn: Any, batch: Batch) -> list[Refused]:
    """The parts of `batch` PostgreSQL refuses on their own (see the module docstring)."""
    found: list[Refused] = []

    async def bisect(parts: list[tuple[str, Any]], error: Exception) -> None:
        if len(parts) == 1:
            found.append(Refused(parts[0][0], parts[0][1], error))
            return
        middle = len(parts) // 2
        for half in (parts[:middle], parts[middle:]):
            refusal = await _probe(conn, half)
            if refusal is not None:
                await bisect(half, refusal)

    parts = parts_of(batch)
    refusal = await _probe(conn, parts)
    if refusal is not None:
        await bisect(parts, refusal)
    return found


async def _probe(conn: Any, parts: list[tuple[str, Any]]) -> Exception | None:
    """The error PostgreSQL refuses these parts with, if any; never commits."""
    probe = probe_batch(parts)
    transaction = conn.transaction()
    await transaction.start()
    try:
        # Nested in `transaction`: the writer's own is a savepoint, and its COMMIT is ours.
        await writer.apply_batch(conn, probe, heads=probe.heads)
    except REFUSED as exc:
        return exc
    finally:
        await transaction.rollback()
    return None
