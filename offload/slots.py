"""Fixed pools of host staging slots (backpressure) and the FIFO host worker thread.

* `SlotPool`: `n_slots` staging slots, each a rows buffer [max_rows, width] in the wire dtype plus an
  ids buffer [max_rows] int64, allocated (and touched) once through the copy engine (pinned on CUDA).
  `acquire()` blocks while every slot is busy: a full pool is backpressure, never an unbounded queue.
* `HostWorker`: one thread that runs host tasks (gathers, gradient accumulation, optimizer steps) in
  submission order (per-layer deferred tasks aside, see the class). FIFO order is what makes the
  scheduler's staleness semantics hold: a gather submitted after an update sees the updated rows. The
  first exception stops execution of later tasks and is kept (with its traceback) for the caller; waits
  poll it so nothing blocks forever.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

__all__ = ["StagingSlot", "SlotPool", "HostWorker", "wait_for", "POLL_S"]

POLL_S = 0.05  # how often blocked callers re-check for a worker error


def wait_for(event: threading.Event, check: Callable[[], None]) -> None:
    """Block until `event` is set; `check()` (raises on a worker error) runs while waiting."""
    while not event.wait(POLL_S):
        check()


class StagingSlot:
    __slots__ = ("index", "rows", "ids")

    def __init__(self, index: int, rows: torch.Tensor, ids: torch.Tensor):
        self.index = index
        self.rows = rows  # [max_rows, width] wire dtype, host (pinned on CUDA)
        self.ids = ids  # [max_rows] int64, host


class SlotPool:
    """`n_slots` staging slots; `acquire()` blocks while all are in use."""

    def __init__(self, engine, n_slots: int, max_rows: int, width: int, dtype: torch.dtype, name: str):
        self.name = name
        self.slots = [StagingSlot(i, engine.alloc_host((max_rows, width), dtype),
                                  engine.alloc_host((max_rows,), torch.int64)) for i in range(n_slots)]
        self.nbytes = sum(s.rows.nbytes + s.ids.nbytes for s in self.slots)
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()
        self.in_use = 0
        self.peak_in_use = 0
        self.waits = 0  # how many acquires had to wait (backpressure events)

    def acquire(self, check: Callable[[], None]) -> StagingSlot:
        with self._cond:
            if not self._free:
                self.waits += 1
            while not self._free:
                self._cond.wait(POLL_S)
                if not self._free:
                    check()
            slot = self._free.pop()
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            return slot

    def release(self, slot: StagingSlot) -> None:
        with self._cond:
            if any(s is slot for s in self._free):
                return  # already released (e.g. by an error path)
            self._free.append(slot)
            self.in_use -= 1
            self._cond.notify()


_STOP = object()


class HostWorker:
    """FIFO thread for host tasks, plus deferred per-layer tasks (see module docstring).

    `submit(fn, layer)` runs in order. `defer(layer, fn)` (ordered like a submit) parks `fn`: it runs
    when the queue is empty (idle time), or at the latest just before the next task of the same layer,
    or at `run_deferred()`. Used for staleness-1 updates: the layer's state is then exactly what it
    would be had `fn` run at its place in the queue, since nothing else touches that layer in between.
    """

    def __init__(self, name: str = "meft-host-worker", init: Callable[[], None] | None = None):
        self._q: queue.Queue = queue.Queue()
        self._deferred: dict = {}  # layer -> fn, insertion-ordered (oldest first)
        if init is not None:
            self._q.put((init, None, "run"))  # first, on the worker thread (thread-local numba settings)
        self.error: BaseException | None = None
        self.on_error: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], layer: int | None = None) -> None:
        self._q.put((fn, layer, "run"))

    def defer(self, layer: int, fn: Callable[[], None]) -> None:
        self._q.put((fn, layer, "defer"))

    def run_deferred(self) -> None:
        """Queue a task that runs every parked task (flush)."""
        self._q.put((None, None, "all"))

    def pending(self) -> int:
        return self._q.qsize() + len(self._deferred)

    def _next(self):
        try:
            return self._q.get_nowait()
        except queue.Empty:
            if self._deferred and self.error is None:  # idle: run the oldest parked task
                layer = next(iter(self._deferred))
                return (self._deferred.pop(layer), layer, "run")
            return self._q.get()

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is _STOP:
                return
            fn, layer, kind = item
            if self.error is not None:
                continue  # broken: drain without running (callers are told through check())
            try:
                if kind == "defer":
                    self._deferred[layer] = fn
                elif kind == "all":
                    while self._deferred:
                        self._deferred.pop(next(iter(self._deferred)))()
                else:
                    if layer is not None and layer in self._deferred:
                        self._deferred.pop(layer)()  # the parked task of this layer comes first
                    fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller by the scheduler
                self.error = exc
                if self.on_error is not None:
                    self.on_error(exc)

    def barrier(self, check: Callable[[], None]) -> None:
        """Wait until every task submitted so far has run (or the worker failed: `check` raises).
        Parked (deferred) tasks may still be parked afterwards; `run_deferred()` first to include them."""
        done = threading.Event()
        self.submit(done.set)
        while not done.wait(POLL_S):
            check()
            if self.error is not None:
                return

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the queued tasks; True if the thread ended within `timeout`."""
        self._q.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()
