"""Gather requests that arrive close together and serve them as one batch.

A server thread per request calls :meth:`MicroBatcher.submit` and waits on the returned future; one
worker thread takes the first waiting request, keeps collecting for ``window_s`` (and whatever
arrives while the previous batch runs), then calls ``run_batch`` on them all under ``lock`` (the
model's lock, so other users of the model still take turns with the batches).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Callable, Sequence


class MicroBatcher:
    """``submit(item) -> Future``; ``run_batch(items) -> results`` (a result that is an exception is raised
    to that item's caller only)."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, window_s: float = 0.02,
                 max_batch: int = 64, lock: Any = None, name: str = "batcher"):
        if window_s < 0 or max_batch < 1:
            raise ValueError(f"window_s must be >= 0 and max_batch >= 1, got {window_s} and {max_batch}")
        self.run_batch, self.window_s, self.max_batch = run_batch, window_s, max_batch
        self.lock = lock if lock is not None else nullcontext()
        self.name = name
        self.batch_sizes: list[int] = []  # for tests and benchmarks: how requests were grouped
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._worker.start()
        return future

    def __call__(self, item: Any) -> Any:
        """Submit and wait: the result, or the item's exception raised here."""
        return self.submit(item).result()

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            try:
                with self.lock:
                    results = list(self.run_batch([item for item, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as error:  # every caller hears of a failure of the whole batch
                for _, future in live:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(live, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
