"""Request batching: many threads submit, one worker thread makes one call per batch.

`Batcher(work, max_batch, window_s)` starts a worker thread that owns whatever `work`
touches (for the server: the `Generator` and so every JAX call). Any thread calls
`submit(key, item)` and gets a `concurrent.futures.Future`. The worker takes the oldest
waiting request, waits until `window_s` after its arrival for more requests with the
same `key` (compatible requests: same task and options), takes up to `max_batch` of them
in arrival order and calls `work(key, items)` once. Requests with other keys stay queued,
in order, for a later batch.

`work` returns one result per item, in order; a result that is an exception instance
becomes that request's error (one bad request need not fail its batch). An exception
raised by `work` becomes the error of every request of the batch, and the worker goes
on serving.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

from absl import logging

Work = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFull(Exception):
    """More requests are waiting than the batcher accepts."""


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) the request was served."""


@dataclasses.dataclass
class _Request:
    key: Hashable
    item: Any
    arrived: float
    future: Future


class Batcher:
    """Groups compatible requests (same key) into one `work(key, items)` call on one worker thread."""

    def __init__(self, work: Work, max_batch: int, window_s: float, max_pending: int = 0,
                 name: str = "batcher"):
        """`max_pending` > 0 bounds the queue (`submit` then raises QueueFull beyond it)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self._work = work
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_pending = max_pending
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.calls = 0  # work calls made so far
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, item: Any) -> Future:
        """Queues `item`; the future gets its result (or error) once its batch has run.

        Raises:
          QueueFull: `max_pending` requests are already waiting.
          BatcherClosed: the batcher is closed.
        """
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            if self.max_pending and len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(_Request(key, item, time.monotonic(), future))
            self._cond.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stops the worker after its current batch; requests still queued fail with BatcherClosed."""
        with self._cond:
            self._closed = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for request in left:
            _settle(request.future, BatcherClosed("the server is shutting down"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        """Blocks for the oldest request, then collects its compatible ones within the window."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending[0]
            deadline = first.arrived + self.window_s
            while (not self._closed and self._count(first.key) < self.max_batch
                   and (remaining := deadline - time.monotonic()) > 0):
                self._cond.wait(remaining)
            if self._closed:
                return None
            batch, rest = [], []
            for request in self._pending:
                (batch if request.key == first.key and len(batch) < self.max_batch else rest).append(request)
            self._pending = rest
            return batch

    def _count(self, key: Hashable) -> int:
        return sum(request.key == key for request in self._pending)

    def _run(self, batch: list[_Request]) -> None:
        """One work call; each future gets its result or the error."""
        self.calls += 1
        try:
            results = list(self._work(batch[0].key, [request.item for request in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"work returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # noqa: BLE001 - reported to every waiting request; the worker goes on
            logging.exception(f"batch of {len(batch)} ({batch[0].key!r}) failed")
            results = [e] * len(batch)
        for request, result in zip(batch, results):
            _settle(request.future, result)


def _settle(future: Future, result: Any) -> None:
    """Sets the future's result, or its exception when `result` is one (no-op when already done)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
