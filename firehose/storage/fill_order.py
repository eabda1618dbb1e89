"""The order a fresh repo's rows go into their tables, so that their index pages end full.

A pure transform (rows in, the same rows out in another order) for the fresh load
(snapshots.fresh_payload): the rows of a repo the database has never seen fill a key range
of every `uri` primary key that holds nothing else yet.

Why: inserted in key order, such a range leaves its B-tree leaf pages half empty. When a
leaf page that is not the index's rightmost one is full, PostgreSQL splits it so that both
halves have the same free space (nbtsplitloc.c: the "split after new item" exception,
`_bt_afternewitemoff`, is skipped for an index of one key column, as every `uri` key is),
and the keys that follow in ascending order all go to the right half: every left half stays
at 50 % for good. A bench/backfill.py run of 1,000 x 500 left `records_pkey` at 10,590 pages
for 501,000 keys, about twice the 5,200 of full pages.

So the rows go in two ascending passes: first FIRST_PASS_OF_PERIOD of every
FILL_PERIOD_ROWS rows (in key order), then the rest. The first pass leaves each finished
page half full of its keys, as before; the second puts the keys in between into the same
pages, each of which then holds (1/2) / (5/9) = 90 % of a page, the fill PostgreSQL itself
gives a rightmost split (its default leaf fillfactor). Exactly half in the first pass would
fill a page to the last byte, and a key more splits it again: on 300 fresh repos of the bench's
repo (150,300 keys) `records_pkey` took 3,184 pages in key order, 2,260 with halves, 2,033
with 5/9, 2,134 with 3/5 and 2,294 with 2/3 (docs/performance-log.md, session 35).

A repo written in batches smaller than itself (the throttled profiles' 5, 20 or 100 records)
is loaded batch after batch, each in key order after the last, and reordering inside a
batch of 5 changes nothing. For those the backfill orders the repo's records across its
batches instead (`chunks_in_filling_order`, backfill/repo_task.py): chunks of
FILL_CHUNK_ROWS records in key order, each chunk in the two passes, and then each batch goes
as it comes (snapshots.write_rows(fill=False)), since a second reorder inside a batch of
first-pass keys would fill their pages before the second pass arrives. A chunk of 450 keys
spans four or five pages; two passes paid on fresh repos of 150 records already (`records_pkey`
1,439 against 1,829 pages for 600 of them), not on the small repos written together.

Invariants kept: the same rows, each once; each pass keeps the order it was given (the
rows' key order), so each pass alone is ascending. Any order of a snapshot's records
converges (each row carries the snapshot's rev); within one batch the guarded writers keep
uri order (prepare.prepare sorts what is not ascending), and only loads that hold the repo's
`actors` row write a batch in two passes (fresh.py: no other writer of the repo's rows can
run until the load commits).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, cycle
from typing import TypeVar

_T = TypeVar("_T")

FILL_PERIOD_ROWS = 9
FIRST_PASS_OF_PERIOD = 5
FILL_CHUNK_ROWS = 50 * FILL_PERIOD_ROWS  # records a repo's batches are ordered across
_FIRST = tuple(i < FIRST_PASS_OF_PERIOD for i in range(FILL_PERIOD_ROWS))
_SECOND = tuple(not first for first in _FIRST)


def page_filling_order(rows: Sequence[_T]) -> list[_T]:
    """`rows` (in key order) in the order that leaves their index pages ~90 % full."""
    return [*compress(rows, cycle(_FIRST)), *compress(rows, cycle(_SECOND))]


def chunks_in_filling_order(items: Iterable[_T], batch_rows: int) -> Iterator[_T]:
    """`items` (in key order) chunk by chunk, FILL_CHUNK_ROWS at a time, each chunk in
    `page_filling_order` if it is longer than a batch of `batch_rows` (a chunk of one batch is
    that batch's to order: snapshots.write_rows). Holds one chunk at a time."""
    chunk: list[_T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == FILL_CHUNK_ROWS:
            yield from _chunk_order(chunk, batch_rows)
            chunk = []
    yield from _chunk_order(chunk, batch_rows)


def _chunk_order(chunk: list[_T], batch_rows: int) -> list[_T]:
    return page_filling_order(chunk) if len(chunk) > batch_rows else chunk
