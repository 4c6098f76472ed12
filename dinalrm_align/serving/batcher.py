"""Micro-batching with admission control: one worker thread merges queued requests into forward passes.

Requests are submitted from any thread and answered through ``concurrent.futures.Future``. The
worker takes the first queued request, waits up to ``max_wait_s`` for more, groups what it has
by ``key`` (e.g. latent shape, u, n_noise) and processes each group in chunks of at most
``max_batch_size`` rows (a request larger than that is processed alone). The model only ever
runs on the worker thread. If a merged chunk fails, each of its requests is retried alone, so
one bad request never fails its neighbours.

Load is bounded: ``submit`` refuses (:class:`QueueFullError`) when ``max_queue`` requests are
already waiting or the rows held (queued + running) would exceed ``max_rows_in_flight``.
Cancelling a request's future before its chunk starts removes it from the queue at once (its
tensors are released and it is never computed). :meth:`MicroBatcher.begin_shutdown` refuses new
work and fails every queued request with :class:`ShuttingDownError`; the chunk in progress
finishes, the rest of its batch is failed the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The request was refused because the queue or the rows in flight are at their limit."""


class ShuttingDownError(RuntimeError):
    """The request was refused or dropped because the server is shutting down."""


@dataclass
class BatcherStats:
    """Counters since start; ``max_*`` are high-water marks."""

    requests: int = 0  # computed
    batches: int = 0
    max_merged_requests: int = 0
    max_merged_rows: int = 0
    failures: int = 0
    cancelled: int = 0  # dropped before compute (client gone, timed out)
    rejected: int = 0  # refused at submit (queue full)
    shed: int = 0  # failed by shutdown without compute
    max_queued: int = 0
    max_rows_in_flight: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)  # identity comparison: removed from the queue by identity
class _Pending(Generic[T]):
    item: T
    rows: int
    future: Future = field(default_factory=Future)
    queued: bool = True


class MicroBatcher(Generic[T, R]):
    """Merge concurrent requests into batches for ``process``.

    Args:
        process: ``process(items) -> results`` (one result per item) for items of one key.
        key: items with equal keys may be merged.
        rows: the number of batch rows an item contributes.
        max_batch_size: most rows per ``process`` call.
        max_wait_s: how long the worker waits for more requests after the first one.
        max_queue: most requests waiting for the worker (``None``: unbounded).
        max_rows_in_flight: most rows queued or running (``None``: unbounded).
    """

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R]],
        *,
        key: Callable[[T], Hashable],
        rows: Callable[[T], int],
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int | None = None,
        max_rows_in_flight: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        for name, value in (("max_queue", max_queue), ("max_rows_in_flight", max_rows_in_flight)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.process = process
        self.key = key
        self.rows = rows
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_rows_in_flight = max_rows_in_flight
        self.stats = BatcherStats()
        self._queue: deque[_Pending[T]] = deque()
        self._rows_in_flight = 0
        self._cond = threading.Condition()
        self._closing = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cond:
            self._closing = self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="reward-micro-batcher", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> int:
        """Refuse new work and fail every queued request with :class:`ShuttingDownError`.

        Returns the number of requests failed. The chunk in progress finishes. Safe to call from
        any thread, more than once.
        """
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            for p in dropped:
                p.queued = False
            self._cond.notify_all()
        n = 0
        for p in dropped:  # outside the lock: done-callbacks take it
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(ShuttingDownError("the reward server is shutting down"))
                n += 1
        with self._cond:
            self.stats.shed += n
        return n

    def stop(self, timeout: float = 10.0) -> None:
        """Fail queued work, let the chunk in progress finish, stop the worker (wait ``timeout`` s)."""
        self.begin_shutdown()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def closing(self) -> bool:
        return self._closing

    def load(self) -> dict[str, int]:
        """Requests waiting and rows held right now."""
        with self._cond:
            return {"queued": len(self._queue), "rows_in_flight": self._rows_in_flight}

    def queue_full(self) -> bool:
        """Whether a request would be refused for the queue depth alone (a cheap early check)."""
        return self.max_queue is not None and len(self._queue) >= self.max_queue

    def count_rejected(self) -> None:
        """Count a request refused before :meth:`submit` (e.g. by an early admission check)."""
        with self._cond:
            self.stats.rejected += 1

    def submit(self, item: T) -> Future:
        """Queue ``item``; the future resolves to its result (or raises its exception).

        Raises :class:`QueueFullError` or :class:`ShuttingDownError` when refused, ``RuntimeError``
        when the worker is not running. Cancel the future to drop the request before it starts.
        """
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        pending: _Pending[T] = _Pending(item, int(self.rows(item)))
        with self._cond:
            if self._closing:
                raise ShuttingDownError("the reward server is shutting down")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            if (
                self.max_rows_in_flight is not None
                and self._rows_in_flight + pending.rows > self.max_rows_in_flight
            ):
                self.stats.rejected += 1
                raise QueueFullError(
                    f"{self._rows_in_flight} rows are queued or running and this request adds {pending.rows}: "
                    f"over the limit of {self.max_rows_in_flight}; retry later"
                )
            self._queue.append(pending)
            self._rows_in_flight += pending.rows
            self.stats.max_queued = max(self.stats.max_queued, len(self._queue))
            self.stats.max_rows_in_flight = max(self.stats.max_rows_in_flight, self._rows_in_flight)
            self._cond.notify_all()
        pending.future.add_done_callback(lambda _f, p=pending: self._release(p))
        return pending.future

    def _release(self, p: _Pending[T]) -> None:
        """Done-callback (any thread): a cancelled queued request leaves the queue; rows are freed."""
        with self._cond:
            if p.queued:
                self._queue.remove(p)
                p.queued = False
                self.stats.cancelled += 1
            self._rows_in_flight -= p.rows

    # ------------------------------------------------------------------ worker
    def _next_batch(self) -> list[_Pending[T]] | None:
        """The first queued request and whatever arrives within ``max_wait_s`` (up to a full batch)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._queue.popleft()]
            deadline = time.monotonic() + self.max_wait_s
            while sum(p.rows for p in batch) < self.max_batch_size and not self._closing:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            for p in batch:
                p.queued = False
            return batch

    def _chunks(self, pending: list[_Pending[T]]) -> list[list[_Pending[T]]]:
        groups: dict[Hashable, list[_Pending[T]]] = {}
        for p in pending:
            groups.setdefault(self.key(p.item), []).append(p)
        chunks: list[list[_Pending[T]]] = []
        for group in groups.values():
            chunk: list[_Pending[T]] = []
            rows = 0
            for p in group:
                if chunk and rows + p.rows > self.max_batch_size:
                    chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(p)
                rows += p.rows
            chunks.append(chunk)
        return chunks

    def _run(self, chunk: list[_Pending[T]]) -> None:
        live = [p for p in chunk if p.future.set_running_or_notify_cancel()]
        with self._cond:
            self.stats.cancelled += len(chunk) - len(live)
        if not live:
            return
        if self._closing:  # shutting down: only the chunk already in progress is computed
            for p in live:
                p.future.set_exception(ShuttingDownError("the reward server is shutting down"))
            with self._cond:
                self.stats.shed += len(live)
            return
        self._deliver(live)

    def _deliver(self, live: list[_Pending[T]]) -> None:
        try:
            results = self.process([p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
        except Exception as exc:
            if len(live) == 1:
                with self._cond:
                    self.stats.failures += 1
                live[0].future.set_exception(exc)
            else:  # isolate the failing request: retry each alone
                for p in live:
                    self._deliver([p])
            return
        with self._cond:
            self.stats.batches += 1
            self.stats.requests += len(live)
            self.stats.max_merged_requests = max(self.stats.max_merged_requests, len(live))
            self.stats.max_merged_rows = max(self.stats.max_merged_rows, sum(p.rows for p in live))
        for p, result in zip(live, results):
            p.future.set_result(result)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for chunk in self._chunks(batch):
                self._run(chunk)
