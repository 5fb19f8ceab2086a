"""Device flags: how compute waits for a row copy that the host worker has not issued yet.

A staged fetch is issued by the main thread but its H2D is issued later, by the host worker, once it has
gathered the rows; there is no copy event yet when the adapter needs the rows. Waiting for the worker on
the main thread would drain the device's queue at every adapted layer (a lockstep). Instead each layer has
one 32-bit counter on the device. The main thread gives every fetch part the layer's next value (`next`)
and makes the *compute stream* wait until the counter reaches it (`wait_device`); the host worker, after
issuing the part's copies, queues the write of that value on the H2D copy queue, behind those copies
(`signal`). The main thread never blocks on the worker; the device waits on the copy.

Rules that keep it free of hangs:

* values only grow, per layer, and the compare is cyclic (`(int32)(flag - value) >= 0`), so a wait for
  an older part is satisfied by any newer signal of the same layer;
* every part the worker cannot finish (an exception, a stopped worker) has its value released from the
  host side (`release_all`): the device never waits for a copy that will not come, and the caller sees
  the worker's exception at its next scheduler call;
* the copy queue carries no op that waits for compute issued after a flag wait it must satisfy: the
  worker issues the flagged copies in submission order, and the scheduler routes host-ids copies around
  that hazard (`offload.fetch.LayerState.stage_ids`).

`DeviceFlags` is the interface; `ThreadFlags` is the CPU twin used with `ThreadCopyEngine` (the "device"
is the caller's thread there, so `wait_device` blocks it, and `signal` is queued on the engine's H2D thread
like a copy); the CUDA version is `offload.cuda_flags.CudaFlags` (stream memory operations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["DeviceFlags", "ThreadFlags", "MASK"]

MASK = 0xFFFFFFFF  # flag values are 32-bit counters (cyclic)


def reached(flag: int, value: int) -> bool:
    """The cyclic compare of a 32-bit stream wait: (int32)(flag - value) >= 0."""
    d = (flag - value) & MASK
    return d < 0x80000000


class DeviceFlags:
    """One growing 32-bit counter per layer (see module docstring)."""

    def __init__(self, n: int):
        self.n = n
        self._issued = [0] * n  # newest value handed out per layer (main thread)
        self._lock = threading.Lock()

    def next(self, i: int) -> int:
        """The value of layer i's next fetch part (call before submitting the part to the worker)."""
        with self._lock:
            self._issued[i] = (self._issued[i] + 1) & MASK
            return self._issued[i]

    def signal(self, i: int, value: int) -> None:  # pragma: no cover - interface
        """Queue `flag[i] = value` on the H2D copy queue, after every copy issued there so far."""
        raise NotImplementedError

    def wait_device(self, i: int, value: int, check: Callable[[], None]) -> None:  # pragma: no cover
        """Make the compute stream wait until flag[i] has reached `value`; `check` raises a worker error."""
        raise NotImplementedError

    def release(self, i: int, value: int) -> None:  # pragma: no cover - interface
        """Set flag[i] = value now, from the host, whatever the copy queue holds (errors, close)."""
        raise NotImplementedError

    def release_all(self) -> None:
        """Every value handed out so far counts as reached: nothing on the device waits any more."""
        with self._lock:
            issued = list(self._issued)
        for i, v in enumerate(issued):
            self.release(i, v)


class ThreadFlags(DeviceFlags):
    """CPU twin: counters under a condition variable; `signal` runs on the engine's H2D thread, in order."""

    def __init__(self, n: int, enqueue: Callable[[Callable[[], None]], None], poll_s: float = 0.05):
        super().__init__(n)
        self._values = [0] * n
        self._cond = threading.Condition()
        self._enqueue, self._poll_s = enqueue, poll_s  # enqueue(op): run op on the H2D copy thread, FIFO

    def _set(self, i: int, value: int) -> None:
        with self._cond:
            if not reached(self._values[i], value):
                self._values[i] = value
            self._cond.notify_all()

    def signal(self, i: int, value: int) -> None:
        self._enqueue(lambda: self._set(i, value))

    def wait_device(self, i: int, value: int, check: Callable[[], None]) -> None:
        with self._cond:
            while not reached(self._values[i], value):
                self._cond.wait(self._poll_s)
                if not reached(self._values[i], value):
                    check()

    def release(self, i: int, value: int) -> None:
        self._set(i, value)

    def value(self, i: int) -> int:
        """Current value of flag i (tests)."""
        with self._cond:
            return self._values[i]
