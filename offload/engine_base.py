"""The copy-engine interface every engine implements, and the rules they share.

`CopyEvent` (completion of one asynchronous copy: host `wait()`, device `wait_device()`, times for the
meter) and `CopyEngine` (allocation, `mark_compute`, `h2d`, `d2h`, `alloc_mapped`, `gather_mapped`,
`alloc_flags` (the device flags of `offload.flags`), `close`), the argument checks both engines run before
a copy, and `call_done`: an `on_done` callback runs on an engine thread and must never kill it (its
exception is kept on the event instead).
The engines themselves are `offload.thread_engine` and `offload.cuda_engine`; `offload.engine` picks one.
"""

from __future__ import annotations

import torch

__all__ = ["H2D", "D2H", "STOP", "CopyEvent", "CopyEngine", "check_host", "check_copy", "check_gather",
           "call_done"]

H2D, D2H = "h2d", "d2h"
STOP = object()  # queued to an engine thread: leave its loop


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
        t = torch.zeros(shape, dtype=dtype) if host is None else check_host(host, shape, dtype)
        return t, t

    def gather_mapped(self, src_mapped, ids_dev, out_dev, *, rows: int = 0, after=None) -> CopyEvent:
        """out_dev[r] = src_mapped[max(ids_dev[r], 0)] read across the link (-1 ids, unused routing slots,
        read row 0: the caller masks them). src_mapped: [N, W] device view from `alloc_mapped`; ids_dev [R]
        int64 on the device; out_dev [R, W] on the device. Returns the event of the read."""
        raise NotImplementedError  # pragma: no cover

    def alloc_flags(self, n: int):
        """`offload.flags.DeviceFlags` with n counters, or None where the engine has none (the scheduler then
        waits for the host worker on the caller's thread). Why no flags: `flags_missing`."""
        return None

    flags_missing = "this engine has no device flags"

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
            queues[d].put(STOP)
        for t in self._threads:
            t.join(timeout=10.0)


def check_host(host: torch.Tensor, shape, dtype) -> torch.Tensor:
    if not isinstance(host, torch.Tensor) or tuple(host.shape) != tuple(shape) or host.dtype != dtype \
            or host.device.type != "cpu" or not host.is_contiguous():
        got = f"{host.dtype} {tuple(host.shape)} on {host.device}" if isinstance(host, torch.Tensor) else type(host)
        raise ValueError(f"alloc_mapped: host must be a contiguous CPU tensor {tuple(shape)} {dtype}, got {got}")
    return host


def check_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.shape != dst.shape:
        raise ValueError(f"copy: src shape {tuple(src.shape)} != dst shape {tuple(dst.shape)}; "
                         "pass views of equal shape")


def check_gather(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    if ids.dim() != 1 or out.dim() != 2 or src.dim() != 2 or out.shape != (ids.shape[0], src.shape[1]) \
            or out.dtype != src.dtype:
        raise ValueError(f"gather_mapped: src {tuple(src.shape)} {src.dtype}, ids {tuple(ids.shape)}, out "
                         f"{tuple(out.shape)} {out.dtype}; out must be [len(ids), src width] of src's dtype")


# ----------------------------------------------------------------------------------- thread engine


def call_done(on_done, ev: CopyEvent) -> None:
    if on_done is None:
        return
    try:
        on_done(ev)
    except BaseException as exc:  # noqa: BLE001 - callbacks must not kill an engine thread
        if ev.error is None:
            ev.error = exc
