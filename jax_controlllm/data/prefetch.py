"""Background prefetching: batches are produced by a thread while the accelerator runs the step.

The Rust tokenizer releases the GIL, so tokenising in a thread overlaps with the training loop's
Python and device work. The state contract is unchanged: ``get_state()`` describes the position
after the last batch *handed out*, not after the batches waiting in the queue, so a checkpoint
taken between steps resumes exactly.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class PrefetchingIterator:
    """Wraps a ``DataIterator``; same interface (``next``, ``get_state``, ``set_state``, ``stats``, ``reset``)."""

    def __init__(self, inner, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.inner, self.depth = inner, depth
        self._thread = None
        self._ended = False
        self._state, self._stats = inner.get_state(), inner.stats

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._ended = True
            raise item.error
        batch, self._state, self._stats = item
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._stop_worker()
        self.inner.set_state(state)
        self._state, self._stats, self._ended = self.inner.get_state(), self.inner.stats, False

    def reset(self) -> None:
        self._stop_worker()
        self.inner.reset()
        self._state, self._stats, self._ended = self.inner.get_state(), self.inner.stats, False

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats

    def __getattr__(self, name: str):          # pad_id, policy, tokenizer, fingerprint, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        """Stop the thread; iterating again continues after the last batch handed out."""
        self._stop_worker()
        self.inner.set_state(self._state)

    def __del__(self):
        try:
            self._stop_worker()
        except Exception:
            pass

    # ---------------------------------------------------------------- worker

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="data-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self.inner)
                except StopIteration:
                    self._put(_END)
                    return
                self._put((batch, self.inner.get_state(), self.inner.stats))
        except BaseException as err:  # surfaced in the consumer's next()
            self._put(_Failure(err))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _stop_worker(self) -> None:
        """Stop the thread and drop what it produced ahead; the inner iterator is then past them,
        so callers restore a state (set_state / reset) right after."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
