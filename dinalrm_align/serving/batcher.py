"""Micro-batching: one worker thread merges queued requests that can share a forward pass.

Requests are submitted from any thread and answered through ``concurrent.futures.Future``. The
worker takes the first queued request, waits up to ``max_wait_s`` for more, groups what it has
by ``key`` (e.g. latent shape, u, n_noise) and processes each group in chunks of at most
``max_batch_size`` rows (a request larger than that is processed alone). The model only ever
runs on the worker thread. If a merged chunk fails, each of its requests is retried alone, so
one bad request never fails its neighbours.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    max_merged_requests: int = 0
    max_merged_rows: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Pending(Generic[T]):
    item: T
    future: Future = field(default_factory=Future)


class MicroBatcher(Generic[T, R]):
    """Merge concurrent requests into batches for ``process``.

    Args:
        process: ``process(items) -> results`` (one result per item) for items of one key.
        key: items with equal keys may be merged.
        rows: the number of batch rows an item contributes.
        max_batch_size: most rows per ``process`` call.
        max_wait_s: how long the worker waits for more requests after the first one.
    """

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R]],
        *,
        key: Callable[[T], Hashable],
        rows: Callable[[T], int],
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.process = process
        self.key = key
        self.rows = rows
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatcherStats()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, name="reward-micro-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued work, then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, item: T) -> Future:
        """Queue ``item``; the future resolves to its result (or raises its exception)."""
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        pending: _Pending[T] = _Pending(item)
        self._queue.put(pending)
        return pending.future

    # ------------------------------------------------------------------ worker
    def _collect(self, first: _Pending[T]) -> tuple[list[_Pending[T]], bool]:
        batch, rows, stop = [first], self.rows(first.item), False
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
            rows += self.rows(nxt.item)
        return batch, stop

    def _chunks(self, pending: list[_Pending[T]]) -> list[list[_Pending[T]]]:
        groups: dict[Hashable, list[_Pending[T]]] = {}
        for p in pending:
            groups.setdefault(self.key(p.item), []).append(p)
        chunks: list[list[_Pending[T]]] = []
        for group in groups.values():
            chunk: list[_Pending[T]] = []
            rows = 0
            for p in group:
                n = self.rows(p.item)
                if chunk and rows + n > self.max_batch_size:
                    chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(p)
                rows += n
            chunks.append(chunk)
        return chunks

    def _run(self, chunk: list[_Pending[T]]) -> None:
        live = [p for p in chunk if p.future.set_running_or_notify_cancel()]
        if live:
            self._deliver(live)

    def _deliver(self, live: list[_Pending[T]]) -> None:
        try:
            results = self.process([p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
        except Exception as exc:
            if len(live) == 1:
                self.stats.failures += 1
                live[0].future.set_exception(exc)
            else:  # isolate the failing request: retry each alone
                for p in live:
                    self._deliver([p])
            return
        self.stats.batches += 1
        self.stats.requests += len(live)
        self.stats.max_merged_requests = max(self.stats.max_merged_requests, len(live))
        self.stats.max_merged_rows = max(self.stats.max_merged_rows, sum(self.rows(p.item) for p in live))
        for p, result in zip(live, results):
            p.future.set_result(result)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            pending, stop = self._collect(first)
            for chunk in self._chunks(pending):
                self._run(chunk)
            if stop:
                break
        self._drain()

    def _drain(self) -> None:
        """Fail whatever was queued after the stop request (nothing waits forever)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the reward server is shutting down"))
