"""Copy engines: one interface for asynchronous host<->device copies, two implementations.

This file owns every `torch.cuda` call of the `offload` package (DESIGN.md, "Devices").

* `CudaCopyEngine`: dedicated H2D and D2H copy streams, blocking CUDA events (the host sleeps on them,
  never spins a core), pinned staging memory allocated at its exact size and registered with
  `cudaHostRegister` (PyTorch's caching host allocator would round each buffer up to a power of two),
  `non_blocking` copies, `record_stream` where a tensor crosses streams. Copies are timed with CUDA
  events only when `timing=True` (profiling); otherwise their times are host-side stamps (issue, and
  the watcher seeing completion). Never constructed without CUDA (it raises).
* `ThreadCopyEngine`: the CPU engine. Each direction has a real worker thread (PCIe is full duplex,
  like the two CUDA copy streams), events are `threading.Event`s, so ordering bugs and missing waits
  show up on a machine without a GPU. An optional simulated link (`link_gbps`, `latency_us`) makes
  each copy last at least `latency + bytes / bandwidth`, and a test-only `delay` injector makes races
  deterministic.

Both engines take `after=` (a marker from `mark_compute()`: the copy starts only after the compute
work issued so far) and `on_done=` (called with the event, from an engine thread, once the copy is
complete). Times on events are `time.perf_counter()` seconds, for the TrafficMeter.

Zero-copy: `alloc_mapped` gives host memory the device reads directly -- on CUDA pinned at its exact
size with `cudaHostRegister(..., cudaHostRegisterMapped)` and seen from the device at the same address
(unified virtual addressing) through `__cuda_array_interface__`, torch's own way to wrap foreign device
memory -- and `gather_mapped` reads rows of it by device ids into a device buffer, on the H2D stream:
the PCIe read is the gather, no host thread takes part. The thread engine's twin is an `index_select`
from the same host tensor on its H2D thread (simulated link included).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

__all__ = ["CopyEvent", "CopyEngine", "ThreadCopyEngine", "CudaCopyEngine", "cuda_available", "make_engine"]

H2D, D2H = "h2d", "d2h"
_STOP = object()


def cuda_available() -> bool:
    """True when a CUDA device can be used (does not initialize CUDA)."""
    return torch.cuda.is_available()


class CopyEvent:
    """Completion of one asynchronous copy. Host-side `wait()`, device-side `wait_device()`."""

    def __init__(self, direction: str, nbytes: int, rows: int, pageable: bool):
        self.direction, self.nbytes, self.rows, self.pageable = direction, nbytes, rows, pageable
        self.start_s = self.end_s = 0.0
        self.error: BaseException | None = None

    def wait(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def wait_device(self) -> None:
        """Make the caller's compute stream wait for the copy (host wait where there are no streams)."""
        self.wait()

    def query(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class CopyEngine:
    """Interface shared by the engines (see module docstring)."""

    name = "abstract"
    device: torch.device
    pinned = False
    pinned_bytes = 0  # exact bytes of page-locked host memory this engine allocated

    def alloc_host(self, shape, dtype) -> torch.Tensor:
        """Staging memory on the host, zero-filled now (first touch at setup, never per step)."""
        return torch.zeros(shape, dtype=dtype)

    def alloc_device(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def alloc_mapped(self, shape, dtype, host: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-filled host memory the device reads directly: (host tensor, device view of the same bytes).
        `host`: map this existing tensor (`shape`, `dtype`, contiguous, CPU; e.g. a node's shared memory)
        instead of new memory. Without a device both are the same tensor."""
        t = torch.zeros(shape, dtype=dtype) if host is None else _check_host(host, shape, dtype)
        return t, t

    def gather_mapped(self, src_mapped, ids_dev, out_dev, *, rows: int = 0, after=None) -> CopyEvent:
        """out_dev[r] = src_mapped[max(ids_dev[r], 0)] read across the link (-1 ids, unused routing slots,
        read row 0: the caller masks them). src_mapped: [N, W] device view from `alloc_mapped`; ids_dev [R]
        int64 on the device; out_dev [R, W] on the device. Returns the event of the read."""
        raise NotImplementedError  # pragma: no cover

    def mark_compute(self):
        """A marker after the compute work issued so far (None where the caller's order suffices)."""
        return None

    def h2d(self, src_host, dst_dev, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        raise NotImplementedError  # pragma: no cover

    def d2h(self, src_dev, dst_host, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        raise NotImplementedError  # pragma: no cover

    def close(self) -> None:
        pass

    def _stop_threads(self, queues: dict) -> None:
        """Stop the per-direction threads fed by `queues`: idempotent, never waits > 10 s per thread."""
        if self._closed:
            return
        self._closed = True
        for d in (H2D, D2H):
            queues[d].put(_STOP)
        for t in self._threads:
            t.join(timeout=10.0)


def _check_host(host: torch.Tensor, shape, dtype) -> torch.Tensor:
    if not isinstance(host, torch.Tensor) or tuple(host.shape) != tuple(shape) or host.dtype != dtype \
            or host.device.type != "cpu" or not host.is_contiguous():
        got = f"{host.dtype} {tuple(host.shape)} on {host.device}" if isinstance(host, torch.Tensor) else type(host)
        raise ValueError(f"alloc_mapped: host must be a contiguous CPU tensor {tuple(shape)} {dtype}, got {got}")
    return host


def _check_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.shape != dst.shape:
        raise ValueError(f"copy: src shape {tuple(src.shape)} != dst shape {tuple(dst.shape)}; "
                         "pass views of equal shape")


def _check_gather(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    if ids.dim() != 1 or out.dim() != 2 or src.dim() != 2 or out.shape != (ids.shape[0], src.shape[1]) \
            or out.dtype != src.dtype:
        raise ValueError(f"gather_mapped: src {tuple(src.shape)} {src.dtype}, ids {tuple(ids.shape)}, out "
                         f"{tuple(out.shape)} {out.dtype}; out must be [len(ids), src width] of src's dtype")


# ----------------------------------------------------------------------------------- thread engine
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
        _check_gather(src_mapped, ids_dev, out_dev)

        def read():
            torch.index_select(src_mapped, 0, ids_dev.clamp(min=0), out=out_dev)

        return self._submit(H2D, None, out_dev, rows, None, op=read)

    def _submit(self, direction, src, dst, rows, on_done, op=None) -> CopyEvent:
        if self._closed:
            raise RuntimeError("ThreadCopyEngine is closed; create a new one")
        if op is None:
            _check_copy(src, dst)
            op = lambda: dst.copy_(src)  # noqa: E731
        moved = dst if src is None else src  # bytes read: the source's (a gather: what lands)
        ev = _ThreadEvent(direction, moved.numel() * moved.element_size(), rows)
        self._queues[direction].put((ev, op, on_done))
        return ev

    def _run(self, direction: str, link: _Link) -> None:
        q = self._queues[direction]
        while True:
            item = q.get()
            if item is _STOP:
                return
            ev, op, on_done = item
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
            _call_done(on_done, ev)

    def close(self) -> None:
        self._stop_threads(self._queues)

    def __repr__(self) -> str:
        return f"ThreadCopyEngine(link_gbps={self.link_gbps}, latency_us={self.latency_us})"


def _call_done(on_done, ev: CopyEvent) -> None:
    if on_done is None:
        return
    try:
        on_done(ev)
    except BaseException as exc:  # noqa: BLE001 - callbacks must not kill an engine thread
        if ev.error is None:
            ev.error = exc


# ------------------------------------------------------------------------------------- CUDA engine
_HOST_REGISTER_MAPPED = 2  # cudaHostRegisterMapped: the registered range is mapped into the device's space


class _MappedBytes:
    """A registered host tensor's bytes as a CUDA array (torch.as_tensor wraps it without copying)."""

    def __init__(self, host: torch.Tensor):
        self.host = host  # keeps the memory alive as long as the device view
        self.__cuda_array_interface__ = {"shape": (host.nbytes,), "typestr": "|u1", "version": 3,
                                         "data": (host.data_ptr(), False), "strides": None}


class _CudaEvent(CopyEvent):
    def __init__(self, engine: CudaCopyEngine, direction, nbytes, rows, pageable):
        super().__init__(direction, nbytes, rows, pageable)
        self._engine = engine
        timing = engine.timing
        # blocking: a host thread waiting on the event sleeps instead of spinning in cudaEventSynchronize
        self._start = torch.cuda.Event(enable_timing=True, blocking=True) if timing else None
        self._end = torch.cuda.Event(enable_timing=timing, blocking=True)
        self.start_s = time.perf_counter()  # host stamp of the issue; replaced by CUDA timing if on

    def wait(self) -> None:
        # protects host reads of the destination (D2H) / host rewrites of the source slot (H2D)
        self._end.synchronize()
        self._engine._stamp(self)

    def wait_device(self) -> None:
        # protects compute kernels from reading the destination buffer before the H2D has landed;
        # the host does not block
        torch.cuda.current_stream(self._engine.device).wait_event(self._end)

    def query(self) -> bool:
        return self._end.query()


class CudaCopyEngine(CopyEngine):
    """Copy streams + events + pinned staging. Raises without CUDA (never constructed there)."""

    name = "cuda"
    pinned = True

    def __init__(self, device="cuda", *, timing: bool = False):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaCopyEngine needs CUDA, and torch.cuda.is_available() is False; "
                               "use ThreadCopyEngine (device='cpu') on this machine")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device={device!r} is not a CUDA device; pass 'cuda' or 'cuda:N'")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timing = bool(timing)
        self._streams = {H2D: torch.cuda.Stream(self.device), D2H: torch.cuda.Stream(self.device)}
        self._registered: list[torch.Tensor] = []  # host tensors registered with cudaHostRegister
        self.pinned_bytes = 0  # exact bytes pinned by this engine (what the RAM check and plan count)
        if self.timing:
            self._ref = torch.cuda.Event(enable_timing=True, blocking=True)
            self._ref.record(torch.cuda.current_stream(self.device))
            self._ref.synchronize()
            self._ref_s = time.perf_counter()
        # one watcher thread per direction runs on_done callbacks once the event has completed
        self._watch = {d: queue.Queue() for d in (H2D, D2H)}
        self._threads = [threading.Thread(target=self._watcher, args=(d,), daemon=True,
                                          name=f"meft-cuda-watch-{d}") for d in (H2D, D2H)]
        self._closed = False
        for t in self._threads:
            t.start()

    def alloc_host(self, shape, dtype) -> torch.Tensor:
        """Zero-filled host memory of exactly numel * itemsize bytes, page-locked with cudaHostRegister
        (not the caching host allocator, which rounds every block up to a power of two)."""
        return self._register(torch.zeros(shape, dtype=dtype), 0)  # zeros: first touch now, at setup

    def _register(self, t: torch.Tensor, flags: int) -> torch.Tensor:
        if t.nbytes:
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, flags)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {t.nbytes} bytes failed with CUDA error {int(err)}; "
                                   "host memory for copies cannot be pinned (check the locked-memory limit, "
                                   "ulimit -l)")
            self._registered.append(t)
            self.pinned_bytes += t.nbytes
        return t

    def alloc_mapped(self, shape, dtype, host: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Host memory pinned at its exact size and mapped into the device's address space; the device view
        wraps the same address (unified virtual addressing: a registered host pointer is valid on the device).
        `host`: register this existing tensor (a node's shared mirror: each rank registers the same pages)."""
        t = torch.zeros(shape, dtype=dtype) if host is None else _check_host(host, shape, dtype)
        t = self._register(t, _HOST_REGISTER_MAPPED)
        if not t.nbytes:
            return t, torch.empty(shape, dtype=dtype, device=self.device)
        raw = torch.as_tensor(_MappedBytes(t), device=self.device)  # [nbytes] uint8 on the device
        return t, raw.view(dtype).view(t.shape)

    def gather_mapped(self, src_mapped, ids_dev, out_dev, *, rows: int = 0, after=None) -> CopyEvent:
        _check_gather(src_mapped, ids_dev, out_dev)
        if self._closed:
            raise RuntimeError("CudaCopyEngine is closed; create a new one")
        stream = self._streams[H2D]
        ev = _CudaEvent(self, H2D, out_dev.numel() * out_dev.element_size(), rows, False)
        with torch.cuda.stream(stream):
            if after is not None:
                # protects the read: ids_dev is produced by compute kernels issued before `after`, and
                # compute kernels issued before it may still read the previous contents of out_dev
                stream.wait_event(after)
            ids_dev.record_stream(stream)  # allocated on the compute stream, read here
            if ev._start is not None:
                ev._start.record(stream)
            torch.index_select(src_mapped, 0, ids_dev.clamp(min=0), out=out_dev)  # the PCIe read
            ev._end.record(stream)
        self._watch[H2D].put((ev, None))
        return ev

    def mark_compute(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def h2d(self, src_host, dst_dev, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        return self._copy(H2D, src_host, dst_dev, rows, after, on_done, host=src_host)

    def d2h(self, src_dev, dst_host, *, rows: int = 0, after=None, on_done=None) -> CopyEvent:
        return self._copy(D2H, src_dev, dst_host, rows, after, on_done, host=dst_host)

    def _copy(self, direction, src, dst, rows, after, on_done, host) -> CopyEvent:
        if self._closed:
            raise RuntimeError("CudaCopyEngine is closed; create a new one")
        _check_copy(src, dst)
        stream = self._streams[direction]
        ev = _CudaEvent(self, direction, src.numel() * src.element_size(), rows, not self._is_pinned(host))
        with torch.cuda.stream(stream):
            if after is not None:
                # protects the device tensor: for H2D, compute kernels still reading the previous
                # contents of dst; for D2H, the kernels producing src must have finished
                stream.wait_event(after)
            if direction == D2H:
                # src was allocated on the compute stream and is read here on the copy stream: keep the
                # caching allocator from reusing its memory until this copy has run
                src.record_stream(stream)
            if ev._start is not None:
                ev._start.record(stream)
            dst.copy_(src, non_blocking=True)
            ev._end.record(stream)
        self._watch[direction].put((ev, on_done))
        return ev

    def _is_pinned(self, host: torch.Tensor) -> bool:
        ptr, end = host.data_ptr(), host.data_ptr() + host.nbytes
        for t in self._registered:
            if t.data_ptr() <= ptr and end <= t.data_ptr() + t.nbytes:
                return True
        return host.is_pinned()

    def _stamp(self, ev: _CudaEvent) -> None:
        if ev.end_s != 0.0:
            return
        if self.timing:  # device time of the copy itself
            ev.start_s = self._ref_s + self._ref.elapsed_time(ev._start) / 1e3
            ev.end_s = self._ref_s + self._ref.elapsed_time(ev._end) / 1e3
        else:  # host stamps: issue -> completion seen (an upper bound of the copy's duration)
            ev.end_s = time.perf_counter()

    def _watcher(self, direction: str) -> None:
        q = self._watch[direction]
        while True:
            item = q.get()
            if item is _STOP:
                return
            ev, on_done = item
            try:
                ev.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the event
                ev.error = exc
            _call_done(on_done, ev)

    def close(self) -> None:
        self._stop_threads(self._watch)
        if self._registered:
            torch.cuda.synchronize(self.device)  # no copy may still read or write a buffer we unpin
            for t in self._registered:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self._registered.clear()

    def __repr__(self) -> str:
        return f"CudaCopyEngine(device={self.device}, timing={self.timing})"


def make_engine(device, *, timing: bool = False) -> CopyEngine:
    """The default engine for `device`: CUDA engine for a CUDA device, thread engine for the CPU.
    `timing`: time every copy with CUDA events (profiling); the thread engine always stamps times."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return CudaCopyEngine(dev, timing=timing)
    if dev.type == "cpu":
        return ThreadCopyEngine()
    raise ValueError(f"device={device!r}: only 'cpu' and 'cuda[:N]' are supported")
