"""CudaCopyEngine: dedicated copy streams, blocking events, pinned memory at its exact size.

This file owns every `torch.cuda` call of the `offload` package (docs/design.md, "Devices"): dedicated H2D
and D2H copy streams, blocking CUDA events (the host sleeps on them, never spins a core), pinned staging
memory allocated at its exact size and registered with `cudaHostRegister` (PyTorch's caching host
allocator would round each buffer up to a power of two), `non_blocking` copies, `record_stream` where a
tensor crosses streams. Copies are timed with CUDA events only when `timing=True` (profiling); otherwise
their times are host-side stamps (issue, and the watcher seeing completion). Never constructed without
CUDA (it raises). Zero-copy: `alloc_mapped` pins host memory with `cudaHostRegisterMapped`, seen from the
device at the same address (unified virtual addressing) through `__cuda_array_interface__`, and
`gather_mapped` reads rows of it by device ids on the H2D stream: the PCIe read is the gather. Device flags
(`alloc_flags`): `offload.cuda_flags`, stream memory operations on the H2D stream and the compute stream.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from offload.cuda_flags import CudaFlags, load_stream_memops
from offload.engine_base import D2H, H2D, STOP, CopyEngine, CopyEvent, call_done, check_copy, check_gather, check_host

__all__ = ["CudaCopyEngine", "cuda_available"]


def cuda_available() -> bool:
    """True when a CUDA device can be used (does not initialize CUDA)."""
    return torch.cuda.is_available()


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
        t = torch.zeros(shape, dtype=dtype) if host is None else check_host(host, shape, dtype)
        t = self._register(t, _HOST_REGISTER_MAPPED)
        if not t.nbytes:
            return t, torch.empty(shape, dtype=dtype, device=self.device)
        raw = torch.as_tensor(_MappedBytes(t), device=self.device)  # [nbytes] uint8 on the device
        return t, raw.view(dtype).view(t.shape)

    def gather_mapped(self, src_mapped, ids_dev, out_dev, *, rows: int = 0, after=None) -> CopyEvent:
        check_gather(src_mapped, ids_dev, out_dev)
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

    def alloc_flags(self, n: int) -> CudaFlags | None:
        """Device flags written on the H2D stream (`offload.cuda_flags`), or None (reason in `flags_missing`)
        where the driver has no stream memory operations or the probe write / wait fails."""
        memops = load_stream_memops()
        if memops is None:
            self.flags_missing = "libcuda has no cuStreamWriteValue32 / cuStreamWaitValue32"
            return None
        flags = CudaFlags(n, self.device, self._streams[H2D], memops)
        try:
            flags.probe()
        except RuntimeError as exc:
            self.flags_missing = str(exc)
            return None
        self.flags_missing = ""
        return flags

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
        check_copy(src, dst)
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
            if item is STOP:
                return
            ev, on_done = item
            try:
                ev.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the event
                ev.error = exc
            call_done(on_done, ev)

    def close(self) -> None:
        self._stop_threads(self._watch)
        if self._registered:
            torch.cuda.synchronize(self.device)  # no copy may still read or write a buffer we unpin
            for t in self._registered:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self._registered.clear()

    def __repr__(self) -> str:
        return f"CudaCopyEngine(device={self.device}, timing={self.timing})"
