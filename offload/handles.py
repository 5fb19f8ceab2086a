"""FetchHandle (what `TransferScheduler.fetch` returns) and the per-layer buffers and state.

Per layer, allocated once: `rows_dev` [max_rows, width] wire dtype on the compute device (the H2D
target), `ids_host` [max_rows] int64 on the host (staging for the gather; pinned on CUDA), `ids_dev`
[max_rows] int64 on the device (only when the device is not the CPU), and `grads_dev`
[max_rows, width] wire dtype on the device, created on first use, for gradients that arrive in another
dtype (cast there before the D2H).
"""

from __future__ import annotations

import threading

import torch

from offload.slots import wait_for

__all__ = ["FetchHandle", "LayerState"]


class LayerState:
    """Buffers and bookkeeping of one adapter layer (see module docstring)."""

    def __init__(self, index: int, engine, max_rows: int, width: int, wire_dtype: torch.dtype, on_host: bool):
        self.index = index
        self.rows_dev = engine.alloc_device((max_rows, width), wire_dtype)  # [max_rows, W] wire
        self.ids_host = engine.alloc_host((max_rows,), torch.int64)  # [max_rows]
        self.ids_dev = self.ids_host if on_host else engine.alloc_device((max_rows,), torch.int64)
        self.grads_dev: torch.Tensor | None = None  # [max_rows, W] wire, lazily
        self.handle: FetchHandle | None = None  # the live fetch of this layer
        self.last_gather: FetchHandle | None = None  # the latest fetch (its gather may still run)
        self.last_d2h = None  # CopyEvent of the latest D2H out of grads_dev
        self.grads_step = -1  # last step in which push_grads was called
        self.triggered_step = -1  # step whose update has been triggered (last micro-batch / finish)
        self.pending_update = False  # staleness 1: a computed-but-unapplied update waits for a fetch
        self.update_hparams = None  # SparseAdamW.hparams() fixed when the layer's update was decided
        self.global_scale = 1.0  # clip="global": scale of the pending update (written by the worker)


class FetchHandle:
    """Rows of one fetch. `wait()` -> rows on the device [R, width] wire dtype.

    Valid until the layer's `push_grads`, `release()`, or the layer's next fetch.
    """

    def __init__(self, sched, layer: LayerState, step: int, micro_batch: int, n_rows: int, ids_dev):
        self._sched, self._layer = sched, layer
        self.layer, self.step, self.micro_batch, self.n_rows = layer.index, step, micro_batch, n_rows
        self._ids_dev = ids_dev  # [R] int64 on the device
        self.gathered = threading.Event()  # set by the host worker once rows are in the slot
        self.copy_event = None  # the H2D CopyEvent, set by the host worker
        self.ids_event = None  # the ids copy (device <-> host), set in fetch
        self.valid = True

    def _live(self, what: str) -> None:
        if not self.valid:
            raise ValueError(f"FetchHandle(layer={self.layer}, step={self.step}, micro_batch="
                             f"{self.micro_batch}).{what}: the handle is no longer valid (push_grads, "
                             "release() or a newer fetch of this layer ended it); keep the rows you need "
                             "or fetch again")

    def wait_gathered(self) -> None:
        wait_for(self.gathered, self._sched._check)

    def wait(self) -> torch.Tensor:
        """Rows on the compute device, [R, width] wire dtype (a view of the layer's buffer)."""
        self._sched._check()
        self._live("wait()")
        if "h2d" not in self._sched._test_skip_waits:
            self.wait_gathered()
            # protects compute from reading rows_dev before the H2D of these rows has landed
            # (CUDA: the compute stream waits; thread engine: the host waits)
            self.copy_event.wait_device()
        self._sched._check()
        return self._layer.rows_dev[: self.n_rows]

    @property
    def ids_host(self) -> torch.Tensor:
        """[R] int64 on the host (waits until the ids have arrived there)."""
        self._live("ids_host")
        if self.ids_event is not None and self.ids_event.direction == "d2h":
            self.wait_gathered()  # the gather ran after the ids D2H completed
        return self._layer.ids_host[: self.n_rows]

    @property
    def ids_dev(self) -> torch.Tensor:
        """[R] int64 on the compute device."""
        self._live("ids_dev")
        if self.ids_event is not None and self.ids_event.direction == "h2d":
            # protects compute from reading ids_dev before its H2D has landed
            self.ids_event.wait_device()
        return self._ids_dev

    def release(self) -> None:
        """End this fetch without gradients (e.g. evaluation); the layer may be fetched again."""
        if self.valid:
            self.valid = False
            if self._layer.handle is self:
                self._layer.handle = None

    def __repr__(self) -> str:
        return (f"FetchHandle(layer={self.layer}, step={self.step}, micro_batch={self.micro_batch}, "
                f"rows={self.n_rows}, valid={self.valid})")
