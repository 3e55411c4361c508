"""Gather concurrent requests into batches for one model worker.

Requests wait in a bounded queue (``queue_size`` requests; a full queue is refused at once, the
caller answers 503). One asyncio task takes the first waiting request, then every other request
that arrives within ``max_wait`` seconds (none when the queue already holds enough) up to
``max_batch`` images, concatenates them and runs the batch in a worker thread, so the event loop
keeps accepting and decoding requests while the model runs. While a batch runs the next one fills
up, so under load batches are large and nobody waits for the timer. ``in_flight`` batches may run
at once (2 for a model worker process: the next batch waits in its pipe).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from backdoorlab.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests already."""


@dataclass(eq=False)
class _Job:
    x: torch.Tensor
    future: asyncio.Future


class Batcher:
    """``await submit(x)`` -> ``fn(x)`` for this request's rows, computed in a shared batch.

    ``fn(x)`` maps uint8 images (B, C, H, W) to a list of B answers; ``split`` answers must be per
    row. ``in_flight`` batches run at once, each in a worker thread (1: never two model calls at
    once; a model worker process takes 2, so that it finds the next batch waiting in its pipe).
    ``run(f, *args)`` runs any other call on the same worker threads.
    """

    def __init__(self, fn: Callable[[torch.Tensor], list[Any]], *, max_batch: int = 1024, max_wait: float = 0.005,
                 queue_size: int = 256, metrics: Metrics | None = None,
                 flagged: Callable[[list[Any]], int] | None = None, in_flight: int = 1) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        self._flagged = flagged or (lambda answers: 0)
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.in_flight = in_flight
        self._running: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="backdoorlab-model")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="backdoorlab-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for t in list(self._running):
            t.cancel()
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(QueueFull())
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ callers
    async def submit(self, x: torch.Tensor) -> list[Any]:
        if len(self._queue) >= self.queue_size:
            self.metrics.rejected_full += 1
            raise QueueFull()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(x, fut))
        self.metrics.queue_depth = len(self._queue)
        assert self._arrived is not None, "Batcher.start() was not awaited"
        self._arrived.set()
        return await fut

    async def run(self, f: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, f, *args)

    # ------------------------------------------------------------------ the worker loop
    async def _take(self) -> list[_Job]:
        """The next batch: the first waiting job, and more until max_batch images or max_wait."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        jobs, n = [], 0
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            if self._queue:
                job = self._queue.popleft()
                if job.future.done():  # the client went away
                    continue
                jobs.append(job)
                n += job.x.shape[0]
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth = len(self._queue)
        return jobs

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.in_flight)
        while True:
            await slots.acquire()
            jobs = await self._take()
            if not jobs:
                slots.release()
                continue
            task = asyncio.create_task(self._batch(jobs))
            self._running.add(task)
            task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))

    async def _batch(self, jobs: list[_Job]) -> None:
        x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
        try:
            answers = await self.run(self.fn, x)
        except Exception as exc:  # noqa: BLE001 - answered to the callers, the loop goes on
            log.exception("the model failed on a batch of %d images", x.shape[0])
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        self.metrics.batch(x.shape[0], self._flagged(answers))
        s = 0
        for j in jobs:
            e = s + j.x.shape[0]
            if not j.future.done():
                j.future.set_result(answers[s:e])
            s = e
