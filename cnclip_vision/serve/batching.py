"""Micro-batching of concurrent requests into one model call, run off the event loop.

A :class:`MicroBatcher` owns a queue and one consumer task. Requests ``await batcher.submit(item)``; the
consumer takes the first waiting item, then everything else already queued (up to ``max_batch``, waiting
at most ``max_wait_s`` for more), splits the batch into groups of equal ``key(item)`` and hands each group
to ``fn`` in ``executor``. While ``fn`` runs, new requests queue up and form the next batch, so batches
grow with the load ("natural" batching) and a lone request waits ``max_wait_s`` at most.

``fn(items) -> results`` gets a list of items and returns one result per item, in order. If it raises
for a batch of several items, each item is retried alone, so one bad input cannot fail its neighbours;
the exception of a single item goes to its caller. Callers that give up (cancelled, e.g. a client that
disconnected) are skipped. A full queue raises :class:`QueueFullError` at once (back-pressure).

Several batchers may share one single-thread executor: model work is then serialised on one thread
(models with state, such as a detector's current vocabulary, stay consistent) while the event loop keeps
accepting and parsing requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

__all__ = ["BatchStats", "MicroBatcher", "QueueFullError"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """More requests are waiting than the batcher accepts (``max_queue``); try again later."""


@dataclass
class BatchStats:
    """Counters of one batcher (for ``/api/health`` and the benchmark)."""

    requests: int = 0
    batches: int = 0
    calls: int = 0
    max_batch_seen: int = 0
    failures: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        mean = self.requests / self.batches if self.batches else 0.0
        return {
            "requests": self.requests,
            "batches": self.batches,
            "model_calls": self.calls,
            "mean_batch": round(mean, 3),
            "max_batch": self.max_batch_seen,
            "failures": self.failures,
            "busy_s": round(self.busy_s, 3),
        }


@dataclass
class _Job(Generic[T]):
    item: T
    future: asyncio.Future[Any]


class MicroBatcher(Generic[T, R]):
    """Batch concurrent ``submit`` calls into calls of ``fn(list_of_items)`` in ``executor``."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        executor: Executor,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        max_queue: int = 1024,
        key: Callable[[T], Hashable] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.fn, self.executor, self.key, self.name = fn, executor, key, name
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job[T]] | None = None
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the consumer task on the running event loop (call from inside it, e.g. at app startup)."""
        if self._task is not None and not self._task.done():
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-consumer")

    async def stop(self) -> None:
        """Stop the consumer; requests still queued get ``RuntimeError``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            job = queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"{self.name} stopped"))

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # ----------------------------------------------------------------------------------- requests
    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (or its exception)."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError(f"{self.name} is not running: call start() inside the event loop first")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting for the model; try again shortly")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(item, future))
        self.stats.requests += 1
        return await future

    # ----------------------------------------------------------------------------------- consumer
    async def _collect(self, queue: asyncio.Queue[_Job[T]]) -> list[_Job[T]]:
        jobs = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            if not queue.empty():
                jobs.append(queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [j for j in jobs if not j.future.done()]  # skip callers that gave up

    async def _run(self) -> None:
        queue = self._queue
        if queue is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(queue)
            if not jobs:
                continue
            self.stats.batches += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(jobs))
            groups: dict[Hashable, list[_Job[T]]] = {}
            for job in jobs:
                groups.setdefault(self.key(job.item) if self.key else None, []).append(job)
            for group in groups.values():
                await self._process(loop, group)

    async def _process(self, loop: asyncio.AbstractEventLoop, group: list[_Job[T]]) -> None:
        self.stats.sizes[len(group)] = self.stats.sizes.get(len(group), 0) + 1
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self._call, [j.item for j in group])
        except Exception as exc:  # noqa: BLE001 - reported to the callers, never lost
            self.stats.busy_s += time.perf_counter() - start
            if len(group) == 1:
                self._settle(group[0], exc=exc)
                return
            logger.debug("%s: a batch of %d failed (%s); retrying one by one", self.name, len(group), exc)
            for job in group:
                await self._process(loop, [job])
            return
        self.stats.busy_s += time.perf_counter() - start
        for job, result in zip(group, results):
            self._settle(job, result=result)

    def _call(self, items: list[T]) -> Sequence[R]:
        self.stats.calls += 1
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: fn returned {len(results)} results for {len(items)} items")
        return results

    def _settle(self, job: _Job[T], *, result: Any = None, exc: BaseException | None = None) -> None:
        if job.future.done():
            return
        if exc is not None:
            self.stats.failures += 1
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
