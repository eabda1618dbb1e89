"""The committer's batch collection (`Worker._collect`) and the reader's side of it
(`Worker._enqueue`): a batch closes at BATCH_MAX_EVENTS, at BATCH_MAX_WAIT_MS after its first
event, or at the reader's end, and the committer is woken once per batch, not per event.

No database: `_collect` and `_enqueue` only touch the worker's queue. The waits are long
where a test needs them not to expire, so a slow machine cannot fail them."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from firehose.settings import Settings
from firehose.worker import _DONE, Worker


def _worker(**env: str) -> Worker:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://unused/db", "RELAY_URL": "ws://127.0.0.1:9", **env}
    )
    return Worker(settings, CollectorRegistry())


class _Wakeups:
    """Counts how often the committer's wait ends (each is a task step of the event loop)."""

    def __init__(self, worker: Worker) -> None:
        self.count = 0
        event = worker._filled
        wait = event.wait

        async def counted() -> bool:
            result = await wait()
            self.count += 1
            return result

        event.wait = counted  # type: ignore[method-assign,assignment]


async def test_a_full_queue_gives_a_batch_without_waiting() -> None:
    worker = _worker()
    for i in range(10):
        await worker._enqueue((0.0, i))
    items, done = await asyncio.wait_for(worker._collect(4, 3600), 30)
    assert [event for _, event in items] == [0, 1, 2, 3]
    assert not done
    items, done = await asyncio.wait_for(worker._collect(100, 0), 30)
    assert [event for _, event in items] == [4, 5, 6, 7, 8, 9]


async def test_a_batch_fills_as_the_reader_queues_with_one_wakeup() -> None:
    worker = _worker()
    wakeups = _Wakeups(worker)

    async def reader() -> None:
        for i in range(50):
            await worker._enqueue((0.0, i))
            await asyncio.sleep(0)  # the committer runs between any two events

    collect = asyncio.create_task(worker._collect(50, 3600))
    await asyncio.sleep(0)  # the committer waits for its first event
    await asyncio.wait_for(reader(), 30)
    items, done = await asyncio.wait_for(collect, 30)
    assert [event for _, event in items] == list(range(50))
    assert not done
    # One wake-up for the first event (queue.get) and one for the rest of the batch; the
    # old loop took a task and a timer per event.
    assert wakeups.count == 1


async def test_the_batch_closes_at_its_wait_limit() -> None:
    worker = _worker()
    for i in range(3):
        await worker._enqueue((0.0, i))
    items, done = await asyncio.wait_for(worker._collect(1000, 0.05), 30)
    assert [event for _, event in items] == [0, 1, 2]
    assert not done
    assert worker._wanted == 0  # the reader no longer signals


async def test_the_readers_end_closes_the_batch_at_once() -> None:
    worker = _worker()

    async def reader() -> None:
        await worker._enqueue((0.0, "a"))
        await asyncio.sleep(0)
        await worker._enqueue((0.0, "b"))
        await worker._enqueue(_DONE)

    task = asyncio.create_task(reader())
    # A wait of an hour: only the reader's end can close this batch in time.
    items, done = await asyncio.wait_for(worker._collect(1000, 3600), 30)
    await task
    assert [event for _, event in items] == ["a", "b"]
    assert done


@pytest.mark.parametrize("queued", [0, 5])
async def test_a_late_reader_end_after_a_wait_is_seen(queued: int) -> None:
    worker = _worker()
    await worker._enqueue((0.0, "first"))
    collect = asyncio.create_task(worker._collect(1000, 3600))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert worker._wanted > 0  # the committer is waiting for the batch to fill
    for i in range(queued):
        await worker._enqueue((0.0, i))
    await worker._enqueue(_DONE)
    items, done = await asyncio.wait_for(collect, 30)
    assert [event for _, event in items] == ["first", *range(queued)]
    assert done


async def test_a_queue_shorter_than_the_batch_still_fills_it() -> None:
    # QUEUE_MAX_FRAMES=10 with batches of 50: the reader blocks on the full queue, so the
    # committer must take what is queued without waiting out its hour-long limit.
    worker = _worker(QUEUE_MAX_FRAMES="10")
    assert worker._queue.maxsize == 10

    async def reader() -> None:
        for i in range(50):
            await worker._enqueue((0.0, i))

    task = asyncio.create_task(reader())
    items, done = await asyncio.wait_for(worker._collect(50, 3600), 30)
    await task
    assert [event for _, event in items] == list(range(50))
    assert not done
