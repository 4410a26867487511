"""MicroBatcher (cnclip_vision.serve.batching): batching, grouping, error isolation, back-pressure. No model,
no timing: the worker function blocks on events, so what lands in which batch is deterministic."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cnclip_vision.serve.batching import MicroBatcher, QueueFullError


class Recorder:
    """A batch function that records its batches; the first call waits until ``release`` is set."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.entered.set()
        if len(self.batches) == 1:
            self.release.wait(10)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on!r}")
        return [f"result-{item}" for item in items]


async def _until(predicate, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def _run(coro):
    return asyncio.run(coro)


def test_requests_queued_while_the_model_is_busy_form_one_batch():
    fn = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, executor=pool, max_batch=8, name="t")
            b.start()
            first = asyncio.ensure_future(b.submit(0))
            await _until(fn.entered.is_set, "the first call started")
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
            await _until(lambda: b.pending == 5, "five requests queued")
            fn.release.set()
            results = await asyncio.gather(first, *rest)
            await b.stop()
            return results, b.stats

    results, stats = _run(main())
    assert results == [f"result-{i}" for i in range(6)]
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]
    assert stats.requests == 6 and stats.batches == 2 and stats.calls == 2 and stats.max_batch_seen == 5


def test_max_batch_splits_and_key_groups():
    fn = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, executor=pool, max_batch=3, key=lambda item: item % 2, name="t")
            b.start()
            first = asyncio.ensure_future(b.submit(100))
            await _until(fn.entered.is_set, "the first call started")
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
            await _until(lambda: b.pending == 6, "six requests queued")
            fn.release.set()
            results = await asyncio.gather(first, *rest)
            await b.stop()
            return results

    results = _run(main())
    assert results == ["result-100"] + [f"result-{i}" for i in range(1, 7)]
    # batches of at most 3 in arrival order, each split by key (odd / even)
    assert fn.batches == [[100], [1, 3], [2], [4, 6], [5]]


def test_one_bad_item_fails_alone():
    fn = Recorder(fail_on=3)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, executor=pool, max_batch=8, name="t")
            b.start()
            first = asyncio.ensure_future(b.submit(0))
            await _until(fn.entered.is_set, "the first call started")
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
            await _until(lambda: b.pending == 5, "five requests queued")
            fn.release.set()
            results = await asyncio.gather(first, *rest, return_exceptions=True)
            await b.stop()
            return results, b.stats

    results, stats = _run(main())
    assert [r for i, r in enumerate(results) if i != 3] == [f"result-{i}" for i in (0, 1, 2, 4, 5)]
    assert isinstance(results[3], ValueError) and "bad item 3" in str(results[3])
    assert fn.batches[1] == [1, 2, 3, 4, 5]  # the batch, then each item alone
    assert sorted(map(tuple, fn.batches[2:])) == [(1,), (2,), (3,), (4,), (5,)]
    assert stats.failures == 1


def test_full_queue_refuses_at_once_and_cancelled_callers_are_skipped():
    fn = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, executor=pool, max_batch=8, max_queue=2, name="t")
            b.start()
            first = asyncio.ensure_future(b.submit(0))
            await _until(fn.entered.is_set, "the first call started")
            kept = asyncio.ensure_future(b.submit(1))
            gone = asyncio.ensure_future(b.submit(2))
            await _until(lambda: b.pending == 2, "two requests queued")
            with pytest.raises(QueueFullError, match="2 requests are already waiting"):
                await b.submit(3)
            gone.cancel()  # the client went away
            fn.release.set()
            results = await asyncio.gather(first, kept)
            await b.stop()
            return results

    assert _run(main()) == ["result-0", "result-1"]
    assert fn.batches == [[0], [1]]


def test_wrong_result_count_is_an_error_and_submit_needs_start():
    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(lambda items: [], executor=pool, name="t")
            with pytest.raises(RuntimeError, match="not running"):
                await b.submit(1)
            b.start()
            with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
                await b.submit(1)
            await b.stop()

    _run(main())
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda items: items, executor=ThreadPoolExecutor(1), max_batch=0)
