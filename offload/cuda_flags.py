"""CudaFlags: the device flags of `offload.flags` on a CUDA device, with stream memory operations.

The counters are an int32 tensor [n] in device memory. `signal` queues `cuStreamWriteValue32` on the
engine's H2D copy stream (the write lands after every copy queued there before it); `wait_device` queues
`cuStreamWaitValue32` (GEQ, a cyclic compare) on the caller's current stream, so the host returns at once
and the compute stream waits on the device; `release` writes from a stream of its own, which nothing else
uses, so it cannot be held up by a copy stream that is itself waiting for compute.

The two driver calls are not bound by PyTorch; they are called through `ctypes` from the driver library
PyTorch has already loaded (`libcuda.so.1`). `probe()` writes and waits once at construction; where the
driver or the device does not support stream memory operations, the engine reports no flags and the
scheduler falls back to waiting for the host worker on the main thread (correct, with a lockstep).
This file and `offload.cuda_engine` own every `torch.cuda` call of the package.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from offload.flags import MASK, DeviceFlags

__all__ = ["CudaFlags", "load_stream_memops"]

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32_t)(*addr - value) >= 0
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT


def load_stream_memops():
    """(write, wait) driver functions, or None where the driver lacks them."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fns = []
    for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name, None)
        if fn is None:
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fns.append(fn)
    return tuple(fns)


class CudaFlags(DeviceFlags):
    """Device counters written by the H2D copy stream and waited on by the compute stream."""

    def __init__(self, n: int, device: torch.device, h2d_stream: torch.cuda.Stream, memops):
        super().__init__(n)
        self.device = device
        self._write, self._wait = memops
        self._h2d = h2d_stream
        self._release_stream = torch.cuda.Stream(device)  # host-side releases: never queued behind copies
        self.flags_dev = torch.zeros(max(n, 1), dtype=torch.int32, device=device)  # [n] the counters
        self._base = self.flags_dev.data_ptr()

    def _call(self, fn, stream: torch.cuda.Stream, i: int, value: int, flags: int) -> None:
        with torch.cuda.device(self.device):  # the driver call uses the calling thread's current context
            err = fn(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(self._base + 4 * i),
                     ctypes.c_uint32(value & MASK), flags)
        if err != 0:
            raise RuntimeError(f"CUDA stream memory operation {fn.__name__} failed with CUresult {err}")

    def signal(self, i: int, value: int) -> None:
        self._call(self._write, self._h2d, i, value, _WRITE_DEFAULT)

    def wait_device(self, i: int, value: int, check: Callable[[], None]) -> None:
        check()  # a worker that already failed has released its flags; raise before queueing more work
        self._call(self._wait, torch.cuda.current_stream(self.device), i, value, _WAIT_GEQ)

    def release(self, i: int, value: int) -> None:
        self._call(self._write, self._release_stream, i, value, _WRITE_DEFAULT)

    def probe(self) -> None:
        """One write and one wait through the driver, synchronised: raises where they are unsupported."""
        self._call(self._write, self._release_stream, 0, 1, _WRITE_DEFAULT)
        self._call(self._wait, self._release_stream, 0, 1, _WAIT_GEQ)
        self._release_stream.synchronize()
        self.flags_dev.zero_()
        torch.cuda.synchronize(self.device)
