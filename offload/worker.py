"""The host worker: one FIFO thread that runs the schedulers' host tasks, and how callers wait on it.

* `HostWorker`: one thread that runs host tasks (gathers, gradient accumulation, optimizer steps) in
  submission order (per-layer deferred tasks aside, see the class). FIFO order is what makes the
  scheduler's staleness semantics hold: a gather submitted after an update sees the updated rows. The
  first exception stops execution of later tasks and is kept (with its traceback) for the caller; waits
  poll it so nothing blocks forever.
* `wait_for`: block on a threading.Event while polling for a worker error.
* `thread_plan` / `numba_threads_setter`: the `host_threads` option (threads of the worker's kernels), sized
  so that the main thread plus the worker's team fit the cores, and honoured for every kernel the worker runs.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import numba
import torch

from offload.kernels import set_thread_budget

__all__ = ["HostWorker", "wait_for", "numba_threads_setter", "thread_plan", "cores_available", "POLL_S"]

POLL_S = 0.05  # how often blocked callers re-check for a worker error


def wait_for(event: threading.Event, check: Callable[[], None]) -> None:
    """Block until `event` is set; `check()` (raises on a worker error) runs while waiting."""
    while not event.wait(POLL_S):
        check()


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_plan(host_threads: int | None, *, engine: str, device: str) -> dict:
    """How a scheduler's threads share the cores: `host_threads` resolved and the count shown.

    Busy threads: the main thread (it drives compute: on a GPU it mostly enqueues; on the CPU device it is
    the device, with torch's intra-op threads) and the host worker's numba team of `host_threads` threads
    (the worker thread is one of them). The engine's two threads copy (thread engine) or sleep in blocking
    CUDA events (CUDA watchers) and are listed apart. Default: every core but the main thread's, so that
    main + worker team == cores. An explicit `host_threads` is honoured as given (`fits` says whether it
    oversubscribes). The CPU device's torch threads are not the scheduler's to size (`torch_threads`)."""
    cores = cores_available()
    limit = numba.config.NUMBA_NUM_THREADS
    if host_threads is None:
        n = max(1, min(limit, cores - 1))
    elif isinstance(host_threads, bool) or not isinstance(host_threads, int) or not 1 <= host_threads <= limit:
        raise ValueError(f"host_threads={host_threads!r} must be an int in [1, {limit}] (NUMBA_NUM_THREADS) or "
                         f"None (default: cores - 1 = {max(1, cores - 1)})")
    else:
        n = host_threads
    return {"cores": cores, "main": 1, "host_threads": n, "engine_threads": 2, "engine": engine,
            "busy": 1 + n, "fits": 1 + n <= cores,
            "torch_threads": torch.get_num_threads() if device == "cpu" else None}


def numba_threads_setter(n: int):
    """The host worker's `init` task: every kernel it runs uses `n` threads (`kernels.set_thread_budget`;
    numba's thread count is per calling thread, so it is set on the worker itself)."""
    return lambda: set_thread_budget(n)  # n comes validated from `thread_plan`


_STOP = object()


class HostWorker:
    """FIFO thread for host tasks, plus deferred per-layer tasks (see module docstring).

    `submit(fn, layer)` runs in order. `defer(layer, fn)` (ordered like a submit) parks `fn`: it runs
    when the queue is empty (idle time) and idle time is not held, or at the latest just before the next
    task of the same layer, or at `run_deferred()`. Used for staleness-1 updates: the layer's state is
    then exactly what it would be had `fn` run at its place in the queue, since nothing else touches that
    layer in between. `hold_idle()` / `release_idle()`: while held (the scheduler holds it during a
    forward pass), idle time runs no parked task, so a gather the forward is about to wait on never
    queues behind an update that started in a gap between two layers' fetches.
    """

    def __init__(self, name: str = "meft-host-worker", init: Callable[[], None] | None = None,
                 on_error: Callable[[], None] | None = None):
        self._q: queue.Queue = queue.Queue()
        self._on_error = on_error  # runs once, on the worker, right after the first error is kept
        self._deferred: dict = {}  # layer -> fn, insertion-ordered (oldest first)
        self._idle_ok = threading.Event()  # set: idle time may run parked tasks (cleared during forwards)
        self._idle_ok.set()
        self.parked_runs_in_idle = 0  # parked tasks run in idle time (instrumentation for tests)
        if init is not None:
            self._q.put((init, None, "run"))  # first, on the worker thread (thread-local numba settings)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], layer: int | None = None) -> None:
        self._q.put((fn, layer, "run"))

    def defer(self, layer: int, fn: Callable[[], None]) -> None:
        self._q.put((fn, layer, "defer"))

    def run_deferred(self) -> None:
        """Queue a task that runs every parked task (flush)."""
        self._q.put((None, None, "all"))

    def hold_idle(self) -> None:
        """From now on idle time runs no parked task (a forward is issuing gathers)."""
        self._idle_ok.clear()

    def release_idle(self) -> None:
        """Idle time may run parked tasks again (the forward is over)."""
        self._idle_ok.set()
        self._q.put((None, None, "wake"))  # a worker blocked on an empty queue looks at its parked tasks

    def pending(self) -> int:
        return self._q.qsize() + len(self._deferred)

    def _next(self):
        try:
            return self._q.get_nowait()
        except queue.Empty:
            if self._deferred and self.error is None and self._idle_ok.is_set():  # idle: the oldest parked
                layer = next(iter(self._deferred))
                self.parked_runs_in_idle += 1
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
                if kind == "wake":
                    continue
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
                self.error = exc  # first: a caller that checks after the hook below already sees it
                if self._on_error is not None:
                    try:
                        self._on_error()  # e.g. release the device flags: nothing may wait for this worker
                    except BaseException:  # noqa: BLE001 - the first error is the one to report
                        pass

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
