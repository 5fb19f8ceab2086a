"""ThreadCopyEngine: the CPU copy engine, the twin that makes ordering bugs show up without a GPU.

Each direction has a real worker thread (PCIe is full duplex, like the two CUDA copy streams), events are
`threading.Event`s, so ordering bugs and missing waits show up on a machine without a GPU. An optional
simulated link (`link_gbps`, `latency_us`) makes each copy last at least `latency + bytes / bandwidth`, and a
test-only `delay` injector makes races deterministic. Device flags (`alloc_flags`, `offload.flags.ThreadFlags`)
are signalled on the H2D thread in queue order, after the copies queued before them. `gather_mapped` is an
`index_select` from the same host tensor on its H2D thread (simulated link included).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from offload.engine_base import D2H, H2D, STOP, CopyEngine, CopyEvent, call_done, check_copy, check_gather
from offload.flags import ThreadFlags

__all__ = ["ThreadCopyEngine"]


class _ThreadEvent(CopyEvent):
    def __init__(self, direction, nbytes, rows, pageable=False):
        super().__init__(direction, nbytes, rows, pageable)
        self._done = threading.Event()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def query(self) -> bool:
        return self._done.is_set()


class _Link:
    """One direction of a simulated link: copies are serialized and last >= latency + bytes/bw."""

    def __init__(self, gbps: float | None, latency_us: float):
        self.bytes_per_s = None if gbps is None else gbps * 1e9
        self.latency_s = latency_us * 1e-6

    def duration(self, nbytes: int) -> float:
        if self.bytes_per_s is None:
            return self.latency_s
        return self.latency_s + nbytes / self.bytes_per_s


class ThreadCopyEngine(CopyEngine):
    """Copies on real worker threads (one per direction); optional simulated link and delay injector.

    `delay(direction, nbytes) -> seconds` (tests only) sleeps before a copy starts, so a consumer
    that forgets to wait reads stale data deterministically.
    """

    name = "thread"

    def __init__(self, *, link_gbps: float | None = None, latency_us: float = 0.0,
                 delay: Callable[[str, int], float] | None = None):
        if link_gbps is not None and not link_gbps > 0:
            raise ValueError(f"link_gbps={link_gbps!r} must be > 0 (or None for no simulated link)")
        if latency_us < 0:
            raise ValueError(f"latency_us={latency_us!r} must be >= 0")
        self.device = torch.device("cpu")
        self.link_gbps, self.latency_us, self.delay = link_gbps, latency_us, delay
        self._queues = {H2D: queue.Queue(), D2H: queue.Queue()}
        self._threads = [threading.Thread(target=self._run, args=(d, _Link(link_gbps, latency_us)),
                                          name=f"meft-copy-{d}", daemon=True) for d in (H2D, D2H)]
        self._closed = False
        for t in self._threads:
            t.start()

    def h2d(self, src_host, dst_dev, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        return self._submit(H2D, src_host, dst_dev, rows, on_done)

    def d2h(self, src_dev, dst_host, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        return self._submit(D2H, src_dev, dst_host, rows, on_done)

    def gather_mapped(self, src_mapped, ids_dev, out_dev, *, rows: int = 0, after=None) -> CopyEvent:
        check_gather(src_mapped, ids_dev, out_dev)

        def read():
            torch.index_select(src_mapped, 0, ids_dev.clamp(min=0), out=out_dev)

        return self._submit(H2D, None, out_dev, rows, None, op=read)

    def alloc_flags(self, n: int) -> ThreadFlags:
        """Device flags whose signals run on the H2D thread after the copies queued before them."""
        return ThreadFlags(n, enqueue=lambda op: self._queues[H2D].put((None, op, None)))

    flags_missing = ""

    def _submit(self, direction, src, dst, rows, on_done, op=None) -> CopyEvent:
        if self._closed:
            raise RuntimeError("ThreadCopyEngine is closed; create a new one")
        if op is None:
            check_copy(src, dst)
            op = lambda: dst.copy_(src)  # noqa: E731
        moved = dst if src is None else src  # bytes read: the source's (a gather: what lands)
        ev = _ThreadEvent(direction, moved.numel() * moved.element_size(), rows)
        self._queues[direction].put((ev, op, on_done))
        return ev

    def _run(self, direction: str, link: _Link) -> None:
        q = self._queues[direction]
        while True:
            item = q.get()
            if item is STOP:
                return
            ev, op, on_done = item
            if ev is None:  # a device-flag signal: in queue order, no link time, never fails
                op()
                continue
            try:
                if self.delay is not None:
                    time.sleep(max(0.0, float(self.delay(direction, ev.nbytes))))
                ev.start_s = time.perf_counter()
                op()
                # the simulated link: the copy is not complete before bytes/bandwidth have elapsed
                remaining = ev.start_s + link.duration(ev.nbytes) - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the event
                ev.error = exc
            ev.end_s = time.perf_counter()
            ev._done.set()
            call_done(on_done, ev)

    def close(self) -> None:
        self._stop_threads(self._queues)

    def __repr__(self) -> str:
        return f"ThreadCopyEngine(link_gbps={self.link_gbps}, latency_us={self.latency_us})"
