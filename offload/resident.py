"""ResidentScheduler: the synchronous, all-rows-resident twin of `offload.TransferScheduler`.

Owns the reference for "every row resident on the compute device". Same surface as TransferScheduler
(`offload.protocol.RowScheduler`: begin_step, begin_micro_batch, fetch(extendable=) -> handle.wait(),
fetch_more, push_grads of any subset of the live rows, finish_step, flush, read_rows,
reserve_live_rows, sync_to_host, load_from_host, close), same constructor checks, same semantics
(wire-dtype rows down and grads back, exact per-row accumulation over micro-batches, lazy AdamW on
touched rows with per-row step counts, clip none/layer/global with `offload.updates.clip_scale`,
staleness 0/1; a step's gradients are summed in fp32 and rounded to the wire dtype once, as the step
union of TransferScheduler sends them), but every layer's weights and moments live on `device` and the update is
`offload.optim.reference_adamw_rows` (plain torch; `offload.sgd_kernel.reference_sgd_rows` for an optimizer
built with rule="sgd") on those device tensors. Nothing is asynchronous and
nothing is metered.

Sparse update (`update_mask=True`): `push_grads(..., keep=)` takes the same per-row mask as
TransferScheduler's; masked rows add no gradient and are not marked touched, so the step's update skips
them (a row is updated when any micro-batch of the step kept it), exactly as the host kernel does.

On a CPU device the device tensors *are* the RowStore tensors (updates land in the store directly);
on a GPU they are copies and `sync_to_host()` writes them back (save/checkpoint call it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from offload.fetch import check_extend, check_grads, check_ids, check_keep, check_live_rows, check_subset
from offload.optim import SparseAdamW, reference_adamw_rows
from offload.protocol import check_scheduler_args
from offload.sgd_kernel import reference_sgd_rows
from offload.steps import StepClock, check_layer
from offload.updates import clip_scale

__all__ = ["ResidentScheduler", "ResidentHandle"]


class ResidentHandle:
    """Completed fetch (or fetch + fetch_more chain): `wait()` -> rows [R, W] in the wire dtype on the
    device. `release()` on the layer's live handle ends the live fetch, as TransferScheduler's does."""

    def __init__(self, rows_dev: Tensor, ids_dev: Tensor, ids_host: Tensor, end: Callable[[], None]):
        self._rows, self.ids_dev, self.ids_host, self._end = rows_dev, ids_dev, ids_host, end

    def wait(self) -> Tensor:
        return self._rows

    def release(self) -> None:
        """End the fetch without gradients (the rows stay readable: they are a private copy)."""
        self._end(self)


class _Live:
    """The live fetch of one layer: rows and ids of every part, [fetched | fetch_more ...]."""

    def __init__(self, key: tuple[int, int], ids_dev: Tensor, ids_host: Tensor, rows: Tensor):
        self.step, self.micro_batch = key
        self.ids_dev, self.ids_host, self.rows = ids_dev, ids_host, rows  # [n], [n], [n, W] wire
        self.owes = False  # holds the layer's staleness-1 update until it ends (extendable fetch)
        self.emitted = False  # that update was applied right after this fetch's gather
        self.handle: ResidentHandle | None = None  # the newest handle of the chain

    @property
    def n_rows(self) -> int:
        return self.ids_host.numel()

    @property
    def update_followed(self) -> bool:
        return self.emitted and not self.owes


class _Layer:
    """Device copies of one store + the step's dense fp32 gradient accumulator."""

    def __init__(self, opt: SparseAdamW, device: torch.device, capacity: int, wire_dtype: torch.dtype):
        s = opt.store
        self.opt, self.wire_dtype = opt, wire_dtype
        self.weights = s.weights.to(device)        # [N, W] fp32 (the store tensor itself on CPU)
        self.exp_avg = s.exp_avg.to(device)        # [N, W] state dtype
        self.exp_avg_sq = s.exp_avg_sq.to(device)  # [N, W] state dtype
        self.steps = s.steps.to(device)            # [N] int64
        self.grad = torch.zeros_like(self.weights)  # [N, W] fp32 sum of this step's row grads (not rounded)
        self.touched = torch.zeros(s.n_rows, dtype=torch.bool, device=device)  # [N]
        self.deferred: tuple[Tensor, Tensor] | None = None  # staleness 1: (ids, scaled grads) to apply
        self.live: _Live | None = None
        self.capacity = capacity  # rows the live fetch may hold (fetch_more included)
        self.triggered_step = -1  # step whose last micro-batch pushed gradients

    def wire_grad(self) -> Tensor:
        """[N, W] fp32: the step's gradient sum as it crosses the wire (rounded once)."""
        return self.grad.to(self.wire_dtype).float()

    def take(self, scale: float) -> tuple[Tensor, Tensor]:
        ids = torch.nonzero(self.touched).flatten()  # [R] ascending
        grads = self.grad.index_select(0, ids).to(self.wire_dtype).float() * scale  # [R, W] the sum, rounded once
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
        if o.rule == "sgd":  # the same rule as the host optimizer's, in plain torch on the device
            reference_sgd_rows(self.weights, self.steps, ids, grads, lr=o.lr, weight_decay=o.weight_decay)
            return
        reference_adamw_rows(self.weights, self.exp_avg, self.exp_avg_sq, self.steps, ids, grads,
                             lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def apply_deferred(self) -> None:
        if self.deferred is not None:
            self.apply(*self.deferred)
            self.deferred = None

    def copy_state(self, to_host: bool) -> None:
        """Device tensors -> RowStore (`to_host`) or back; nothing to copy where they are the same."""
        s = self.opt.store
        for name in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            dev, host = getattr(self, name), getattr(s, name)
            if dev.data_ptr() != host.data_ptr():
                (host if to_host else dev).copy_(dev if to_host else host)


class ResidentScheduler:
    """Drop-in for TransferScheduler with all rows resident on `device` (see module docstring)."""

    def __init__(self, optimizers: Sequence[SparseAdamW], *, device="cpu", wire_dtype=torch.bfloat16,
                 max_rows: int, staleness: int = 0, clip: str = "none", max_norm: float = 1.0,
                 max_live_rows: int | None = None, update_mask: bool = False):
        optimizers = list(optimizers)
        if update_mask not in (True, False):
            raise ValueError(f"update_mask={update_mask!r} must be True or False")
        self.update_mask = update_mask  # push_grads may carry a sparse update's row mask (`keep`)
        check_scheduler_args(optimizers, wire_dtype, max_rows, staleness, clip, max_norm)
        if any(o.store.shared for o in optimizers):
            raise ValueError("ResidentScheduler has no data parallel path, but a store lives in a node's shared "
                             "memory (RowStore(..., node=...)); use TransferScheduler with process_group=")
        capacity = check_live_rows(max_live_rows, max_rows)
        self.device = torch.device(device)
        self.layers = [_Layer(o, self.device, capacity, wire_dtype) for o in optimizers]
        self.width = optimizers[0].store.width
        self.wire_dtype, self.max_rows = wire_dtype, max_rows
        self.staleness, self.clip, self.max_norm = staleness, clip, float(max_norm)
        self.clock = StepClock()

    # the step structure lives in the clock (offload.steps); these read it
    step = property(lambda self: self.clock.step)
    micro_batch = property(lambda self: self.clock.micro_batch)
    accum_steps = property(lambda self: self.clock.accum_steps)

    def _layer(self, layer) -> _Layer:
        return self.layers[check_layer(layer, len(self.layers))]

    # ---- step structure -----------------------------------------------------------------------
    def begin_step(self, accum_steps: int = 1) -> None:
        self.clock.begin_step(accum_steps)

    def begin_micro_batch(self) -> None:
        self.clock.begin_micro_batch()

    # ---- rows down ----------------------------------------------------------------------------
    def fetch(self, layer: int, ids: Tensor, *, extendable: bool = False) -> ResidentHandle:
        """Rows `ids` of `layer`, gathered now. Staleness 1: the layer's delayed update is applied right
        after this gather, or (`extendable`) when this fetch ends, so fetch_more reads the same state."""
        lay = self._layer(layer)
        check_ids(ids, "fetch", self.max_rows, self.device)
        key = self.clock.need_step("fetch")
        if lay.live is not None and (lay.live.step, lay.live.micro_batch) == key:
            raise ValueError(f"fetch: layer {layer} was already fetched in micro-batch {key[1]} of step "
                             f"{key[0]}; reuse that handle (recomputation must not fetch again), add rows "
                             "with fetch_more, or call handle.release() first")
        if lay.triggered_step == self.step:
            raise ValueError(f"fetch: layer {layer} already received its last-micro-batch gradients in step "
                             f"{self.step} (its update is under way); fetch it in the next step")
        if lay.live is not None:
            self._end_live(lay)  # an earlier micro-batch's fetch without gradients
        ids_dev = ids.to(self.device)
        rows = self._gather(lay, ids_dev)  # [R, W] gathered first
        lay.live = live = _Live(key, ids_dev, ids.cpu(), rows)
        if lay.deferred is not None:  # staleness 1: step t's update lands after step t+1's gather
            live.owes = bool(extendable)
            if not extendable:
                lay.apply_deferred()
                live.emitted = True
        return self._handle(lay)

    def fetch_more(self, layer: int, ids: Tensor) -> ResidentHandle:
        """Append rows `ids` ([M], none live) to the layer's live fetch: wait() -> [live | added] rows."""
        lay = self._layer(layer)
        m = check_ids(ids, "fetch_more", self.max_rows, self.device)
        step, mb = self.clock.need_step("fetch_more")
        live = lay.live
        check_extend(live, m, layer, step, mb, lay.capacity, self.max_rows)
        ids_dev = ids.to(self.device)
        rows = lay.weights.index_select(0, ids_dev).to(self.wire_dtype)  # [M, W]
        live.ids_dev, live.ids_host = torch.cat([live.ids_dev, ids_dev]), torch.cat([live.ids_host, ids.cpu()])
        live.rows = torch.cat([live.rows, rows])  # [n0 + M, W]
        return self._handle(lay)

    def _gather(self, lay: _Layer, ids_dev: Tensor) -> Tensor:
        """Rows [R, W] wire dtype for ids [R]; -1 padding (unused routing slots) gives zero rows. The twin
        may synchronise: it compacts the ids on the host side of the comparison."""
        valid = ids_dev >= 0  # [R]
        rows = torch.zeros(ids_dev.numel(), self.width, dtype=self.wire_dtype, device=self.device)
        rows[valid] = lay.weights.index_select(0, ids_dev[valid]).to(self.wire_dtype)
        return rows

    def _handle(self, lay: _Layer) -> ResidentHandle:
        live = lay.live
        live.handle = ResidentHandle(live.rows, live.ids_dev, live.ids_host, lambda h: self._release(lay, h))
        return live.handle

    def _release(self, lay: _Layer, handle: ResidentHandle) -> None:
        if lay.live is not None and lay.live.handle is handle:
            self._end_live(lay)

    def _end_live(self, lay: _Layer) -> None:
        """End the layer's live fetch; apply the staleness-1 update it held back, if any."""
        live, lay.live = lay.live, None
        if live.owes:
            lay.apply_deferred()

    def reserve_live_rows(self, rows: int) -> None:
        """Let each layer's live fetch hold `rows` (>= max_rows) rows; between steps only."""
        rows = check_live_rows(rows, self.max_rows)
        self.clock.check_between_steps("reserve_live_rows")
        for lay in self.layers:
            lay.capacity = max(lay.capacity, rows)

    # ---- grads back ---------------------------------------------------------------------------
    def push_grads(self, layer: int, ids: Tensor, grads: Tensor, keep: Tensor | None = None) -> None:
        """Gradients [K, W] for `ids` [K], the fetched ids or any subset of the live rows (each once);
        ends the live fetch. Rows not pushed get no gradient and no update; nor do rows with `keep` [K]
        False (a sparse update's mask; needs update_mask=True)."""
        lay = self._layer(layer)
        live = lay.live
        if live is None or (live.step, live.micro_batch) != (self.step, self.micro_batch):
            raise ValueError(f"push_grads: layer {layer} has no live fetch in micro-batch {self.micro_batch} "
                             f"of step {self.step}; call fetch({layer}, ids) first (once per micro-batch)")
        k = check_ids(ids, "push_grads", self.max_rows, self.device)
        check_grads(grads, k, self.width, layer, self.device)
        valid = ids >= 0  # [K] -1: padding of a fixed-shape fetch, no gradient crosses for it
        if keep is not None:
            valid = valid & check_keep(keep, k, self.update_mask, grads.device).to(valid.device)  # [K]
        ids, grads = ids[valid], grads[valid.to(grads.device)]
        check_subset(ids.cpu(), live.ids_host, layer)
        self._end_live(lay)
        ids_dev = ids.to(self.device)
        lay.grad.index_add_(0, ids_dev, grads.to(self.device).float())  # [K, W] summed in fp32; rounded at the step end
        lay.touched[ids_dev] = True
        if self.clock.last_micro_batch:
            lay.triggered_step = self.step

    # ---- step end -----------------------------------------------------------------------------
    def _scales(self) -> list[float]:
        if self.clip == "none":
            return [1.0] * len(self.layers)
        sq = [float(lay.wire_grad().double().pow(2).sum()) for lay in self.layers]  # pending rows only are != 0
        if self.clip == "layer":
            return [clip_scale(s, self.max_norm) for s in sq]
        return [clip_scale(sum(sq), self.max_norm)] * len(self.layers)

    def finish_step(self) -> None:
        self.clock.check_in_step("finish_step")
        for lay in self.layers:
            if lay.live is not None:
                self._end_live(lay)  # fetches without gradients; applies an update a prefetch held back
        for lay, scale in zip(self.layers, self._scales()):
            ids, grads = lay.take(scale)
            if self.staleness == 0:
                lay.apply(ids, grads)
            elif ids.numel():  # staleness 1: lands after the layer's next fetch has gathered
                lay.apply_deferred()  # (already applied: pushing grads needed a fetch this step)
                lay.deferred = (ids, grads)
        self.clock.finish_step()

    def flush(self) -> None:
        """Apply every deferred (staleness 1) update now; the RowStores are then current."""
        for lay in self.layers:
            if lay.live is not None and lay.live.owes:
                lay.live.owes = False
                lay.live.emitted = True
            lay.apply_deferred()
        self.sync_to_host()

    # ---- host copies and inference ------------------------------------------------------------
    def read_rows(self, layer: int, ids: Tensor) -> Tensor:
        """Rows [R, W] fp32 on the device for inference (no step bookkeeping, not counted); -1 ids (unused
        routing slots) read row 0, which the caller masks. No host synchronisation."""
        return self._layer(layer).weights.index_select(0, ids.to(self.device).clamp(min=0))

    def sync_to_host(self) -> None:
        """Copy device weights/moments/steps into the RowStores (no-op on a CPU device)."""
        for lay in self.layers:
            lay.copy_state(to_host=True)

    def load_from_host(self) -> None:
        """Copy the RowStores into the device tensors (after a store was loaded)."""
        for lay in self.layers:
            lay.copy_state(to_host=False)

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
