"""The committer's batch collection (`EventQueue.collect`) and the reader's side of it
(`EventQueue.put`, `close`): a batch closes at BATCH_MAX_EVENTS, at BATCH_MAX_WAIT_MS after
its first event, or at the reader's end, and the committer is woken once per batch, not per
event.

No database: the queue is all they touch. The waits are long
where a test needs them not to expire, so a slow machine cannot fail them."""

from __future__ import annotations

import asyncio

import pytest

from firehose.live.queue import EventQueue
from firehose.settings import Settings
from firehose.worker import Worker

QUEUE_MAX_FRAMES = 5000  # the setting's default


class _Wakeups:
    """Counts how often the committer's wait ends (each is a task step of the event loop)."""

    def __init__(self, queue: EventQueue) -> None:
        self.count = 0
        event = queue._filled
        wait = event.wait

        async def counted() -> bool:
            result = await wait()
            self.count += 1
            return result

        event.wait = counted  # type: ignore[method-assign,assignment]


async def test_a_full_queue_gives_a_batch_without_waiting() -> None:
    queue = EventQueue(QUEUE_MAX_FRAMES)
    for i in range(10):
        await queue.put((0.0, i))
    items, done = await asyncio.wait_for(queue.collect(4, 3600), 30)
    assert [event for _, event in items] == [0, 1, 2, 3]
    assert not done
    items, done = await asyncio.wait_for(queue.collect(100, 0), 30)
    assert [event for _, event in items] == [4, 5, 6, 7, 8, 9]


async def test_a_batch_fills_as_the_reader_queues_with_one_wakeup() -> None:
    queue = EventQueue(QUEUE_MAX_FRAMES)
    wakeups = _Wakeups(queue)

    async def reader() -> None:
        for i in range(50):
            await queue.put((0.0, i))
            await asyncio.sleep(0)  # the committer runs between any two events

    collect = asyncio.create_task(queue.collect(50, 3600))
    await asyncio.sleep(0)  # the committer waits for its first event
    await asyncio.wait_for(reader(), 30)
    items, done = await asyncio.wait_for(collect, 30)
    assert [event for _, event in items] == list(range(50))
    assert not done
    # One wake-up for the first event (queue.get) and one for the rest of the batch; the
    # old loop took a task and a timer per event.
    assert wakeups.count == 1


async def test_the_batch_closes_at_its_wait_limit() -> None:
    queue = EventQueue(QUEUE_MAX_FRAMES)
    for i in range(3):
        await queue.put((0.0, i))
    items, done = await asyncio.wait_for(queue.collect(1000, 0.05), 30)
    assert [event for _, event in items] == [0, 1, 2]
    assert not done
    assert queue._wanted == 0  # the reader no longer signals


async def test_the_readers_end_closes_the_batch_at_once() -> None:
    queue = EventQueue(QUEUE_MAX_FRAMES)

    async def reader() -> None:
        await queue.put((0.0, "a"))
        await asyncio.sleep(0)
        await queue.put((0.0, "b"))
        await queue.close()

    task = asyncio.create_task(reader())
    # A wait of an hour: only the reader's end can close this batch in time.
    items, done = await asyncio.wait_for(queue.collect(1000, 3600), 30)
    await task
    assert [event for _, event in items] == ["a", "b"]
    assert done


@pytest.mark.parametrize("queued", [0, 5])
async def test_a_late_reader_end_after_a_wait_is_seen(queued: int) -> None:
    queue = EventQueue(QUEUE_MAX_FRAMES)
    await queue.put((0.0, "first"))
    collect = asyncio.create_task(queue.collect(1000, 3600))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert queue._wanted > 0  # the committer is waiting for the batch to fill
    for i in range(queued):
        await queue.put((0.0, i))
    await queue.close()
    items, done = await asyncio.wait_for(collect, 30)
    assert [event for _, event in items] == ["first", *range(queued)]
    assert done


async def test_a_queue_shorter_than_the_batch_still_fills_it() -> None:
    # QUEUE_MAX_FRAMES=10 with batches of 50: the reader blocks on the full queue, so the
    # committer must take what is queued without waiting out its hour-long limit.
    queue = EventQueue(10)

    async def reader() -> None:
        for i in range(50):
            await queue.put((0.0, i))

    task = asyncio.create_task(reader())
    items, done = await asyncio.wait_for(queue.collect(50, 3600), 30)
    await task
    assert [event for _, event in items] == list(range(50))
    assert not done


def test_the_worker_queue_is_bounded_by_queue_max_frames() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://unused/db",
            "RELAY_URL": "ws://127.0.0.1:9",
            "QUEUE_MAX_FRAMES": "10",
        }
    )
    worker = Worker(settings)
    assert worker._queue.maxsize == 10


async def test_put_waits_while_the_queue_is_full() -> None:
    # Back-pressure (invariant 4): a full queue holds the reader until the committer takes.
    queue = EventQueue(10)
    for i in range(10):
        await queue.put((0.0, i))
    blocked = asyncio.create_task(queue.put((0.0, 10)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not blocked.done()
    assert queue.qsize() == 10
    items, done = await asyncio.wait_for(queue.collect(4, 3600), 30)
    await asyncio.wait_for(blocked, 30)
    assert [event for _, event in items] == [0, 1, 2, 3]
    assert not done
    assert queue.qsize() == 7
