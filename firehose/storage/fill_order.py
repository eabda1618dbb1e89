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
with 5/9, 2,134 with 3/5 and 2,294 with 2/3 (docs/performance.md, session 35).

Invariants kept: the same rows, each once; each pass keeps the order it was given (the
rows' key order), so each pass alone is ascending. Only loads that hold the repo's `actors`
row use it (fresh.py: no other writer of the repo's rows can run until the load commits), so
the uri order that guarded writers keep among themselves (writer.prepare) is not needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress, cycle
from typing import TypeVar

_T = TypeVar("_T")

FILL_PERIOD_ROWS = 9
FIRST_PASS_OF_PERIOD = 5
_FIRST = tuple(i < FIRST_PASS_OF_PERIOD for i in range(FILL_PERIOD_ROWS))
_SECOND = tuple(not first for first in _FIRST)


def page_filling_order(rows: Sequence[_T]) -> list[_T]:
    """`rows` (in key order) in the order that leaves their index pages ~90 % full."""
    return [*compress(rows, cycle(_FIRST)), *compress(rows, cycle(_SECOND))]
