"""ResidentScheduler: the synchronous, all-rows-resident twin of `offload.TransferScheduler`.

Owns the reference for "every row resident on the compute device": same API as TransferScheduler
(begin_step, begin_micro_batch, fetch -> handle.wait(), push_grads, finish_step, flush, close), same
semantics (wire-dtype rows down and grads back, exact per-row accumulation over micro-batches, lazy
AdamW on touched rows with per-row step counts, clip none/layer/global, staleness 0/1), but every
layer's weights and moments live on `device` and the update is `offload.optim.reference_adamw_rows`
(plain torch) on those device tensors. Nothing is asynchronous and nothing is metered.

On a CPU device the device tensors *are* the RowStore tensors (updates land in the store directly);
on a GPU they are copies and `sync_to_host()` writes them back (save/checkpoint call it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from offload.optim import SparseAdamW, reference_adamw_rows

__all__ = ["ResidentScheduler", "ResidentHandle", "clip_coef"]


def clip_coef(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


class ResidentHandle:
    """Completed fetch: `wait()` returns rows [R, W] in the wire dtype on the device."""

    def __init__(self, rows_dev: Tensor, ids_dev: Tensor):
        self._rows, self.ids_dev = rows_dev, ids_dev
        self.ids_host = ids_dev.cpu()

    def wait(self) -> Tensor:
        return self._rows

    def release(self) -> None:
        """Nothing to give back (the rows are a private copy)."""


class _Layer:
    """Device copies of one store + the step's dense fp32 gradient accumulator."""

    def __init__(self, opt: SparseAdamW, device: torch.device):
        s = opt.store
        self.opt = opt
        self.weights = s.weights.to(device)        # [N, W] fp32 (the store tensor itself on CPU)
        self.exp_avg = s.exp_avg.to(device)        # [N, W] state dtype
        self.exp_avg_sq = s.exp_avg_sq.to(device)  # [N, W] state dtype
        self.steps = s.steps.to(device)            # [N] int64
        self.grad = torch.zeros_like(self.weights)  # [N, W] fp32 pending row grads of this step
        self.touched = torch.zeros(s.n_rows, dtype=torch.bool, device=device)  # [N]
        self.deferred: tuple[Tensor, Tensor] | None = None  # staleness 1: (ids, scaled grads) to apply
        self.fetched_this_step = False

    def take(self, scale: float) -> tuple[Tensor, Tensor]:
        ids = torch.nonzero(self.touched).flatten()  # [R] ascending
        grads = self.grad.index_select(0, ids) * scale  # [R, W] fp32
        self.grad.index_fill_(0, ids, 0.0)
        self.touched.zero_()
        return ids, grads

    def apply(self, ids: Tensor, grads: Tensor) -> None:
        if ids.numel() == 0:
            return
        if not bool(torch.isfinite(grads).all()):
            self.opt.skipped_steps += 1  # same policy as SparseAdamW.step: skip the whole layer
            return
        o = self.opt
        reference_adamw_rows(self.weights, self.exp_avg, self.exp_avg_sq, self.steps, ids, grads,
                             lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


class ResidentScheduler:
    """Drop-in for TransferScheduler with all rows resident on `device` (see module docstring)."""

    partial_push = True  # push_grads accepts any ids (not only those of the layer's live fetch)

    def __init__(self, optimizers: Sequence[SparseAdamW], *, device="cpu", engine=None,
                 wire_dtype=torch.bfloat16, max_rows: int, n_slots: int = 2, staleness: int = 0,
                 clip: str = "none", max_norm: float = 1.0, meter=None):
        if clip not in ("none", "layer", "global"):
            raise ValueError(f"clip = {clip!r}: use 'none', 'layer' or 'global'")
        if staleness not in (0, 1):
            raise ValueError(f"staleness = {staleness!r}: use 0 or 1")
        self.device = torch.device(device)
        self.layers = [_Layer(o, self.device) for o in optimizers]
        self.wire_dtype, self.max_rows = wire_dtype, int(max_rows)
        self.staleness, self.clip, self.max_norm = staleness, clip, float(max_norm)
        self.meter = meter
        self.step = 0
        self.micro_batch = 0
        self.accum_steps = 1
        self.fetches = 0        # fetch() calls (all steps)
        self.rows_fetched = 0   # rows moved by fetch() (all steps)

    # ---- step structure -----------------------------------------------------------------------
    def begin_step(self, accum_steps: int = 1) -> None:
        self.step += 1
        self.micro_batch = 0
        self.accum_steps = int(accum_steps)
        for lay in self.layers:
            lay.fetched_this_step = False

    def begin_micro_batch(self) -> None:
        self.micro_batch += 1

    # ---- rows down / grads back ---------------------------------------------------------------
    def fetch(self, layer: int, ids: Tensor) -> ResidentHandle:
        lay = self.layers[layer]
        if ids.numel() > self.max_rows:
            raise ValueError(f"fetch of {ids.numel()} rows > max_rows={self.max_rows}")
        ids_dev = ids.to(self.device)
        rows = lay.weights.index_select(0, ids_dev).to(self.wire_dtype)  # [R, W] gathered first
        if not lay.fetched_this_step:
            lay.fetched_this_step = True
            if lay.deferred is not None:  # staleness 1: step t's update lands after step t+1's gather
                lay.apply(*lay.deferred)
                lay.deferred = None
        self.fetches += 1
        self.rows_fetched += int(ids.numel())
        return ResidentHandle(rows, ids_dev)

    def push_grads(self, layer: int, ids: Tensor, grads: Tensor) -> None:
        lay = self.layers[layer]
        ids_dev = ids.to(self.device)
        g = grads.to(self.device).to(self.wire_dtype).float()  # [R, W] as it would cross the wire
        lay.grad.index_add_(0, ids_dev, g)
        lay.touched[ids_dev] = True

    def read_rows(self, layer: int, ids: Tensor) -> Tensor:
        """Rows [R, W] fp32 on the device for inference (no step bookkeeping, not counted)."""
        return self.layers[layer].weights.index_select(0, ids.to(self.device))

    def _scales(self) -> list[float]:
        if self.clip == "none":
            return [1.0] * len(self.layers)
        sq = [float(lay.grad.double().pow(2).sum()) for lay in self.layers]  # pending rows only are != 0
        if self.clip == "layer":
            return [clip_coef(math.sqrt(s), self.max_norm) for s in sq]
        return [clip_coef(math.sqrt(sum(sq)), self.max_norm)] * len(self.layers)

    def finish_step(self) -> None:
        for lay, scale in zip(self.layers, self._scales()):
            ids, grads = lay.take(scale)
            if self.staleness == 0:
                lay.apply(ids, grads)
            else:
                if lay.deferred is not None:  # layer not fetched during this step: apply in order
                    lay.apply(*lay.deferred)
                lay.deferred = (ids, grads)

    def flush(self) -> None:
        """Apply every deferred (staleness 1) update now; the RowStores are then current."""
        for lay in self.layers:
            if lay.deferred is not None:
                lay.apply(*lay.deferred)
                lay.deferred = None
        self.sync_to_host()

    def sync_to_host(self) -> None:
        """Copy device weights/moments/steps into the RowStores (no-op on a CPU device)."""
        for lay in self.layers:
            s = lay.opt.store
            for name in ("weights", "exp_avg", "exp_avg_sq", "steps"):
                src, dst = getattr(lay, name), getattr(s, name)
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)

    def load_from_host(self) -> None:
        """Copy the RowStores into the device tensors (after a store was loaded)."""
        for lay in self.layers:
            s = lay.opt.store
            for name in ("weights", "exp_avg", "exp_avg_sq", "steps"):
                dst, src = getattr(lay, name), getattr(s, name)
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
