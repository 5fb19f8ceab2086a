"""The union of a layer's rows over the micro-batches of one step (gradient accumulation).

With `accum_steps > 1` a layer's active sets overlap from one micro-batch to the next. `TransferScheduler`
then moves each row of the step's union once (docs/design.md "One training step", traffic at the
analytic minimum):

* rows down: a row already sent this step is not gathered or copied again; the device keeps the step's
  rows in `rows_dev` [U + 1, W] (wire dtype) and a fetch's rows are taken from there by slot
  (`index_select` on the compute stream). Only at staleness 0 and with staged fetches: at staleness 1 the
  previous step's update lands between two micro-batches, so later micro-batches must read rows again,
  and zero-copy reads each micro-batch's rows from the mapped mirror anyway.
* gradients up: pushes are summed on the device in fp32, `grads_dev` [U + 1, W], and cross once, at the
  layer's last push of the step, rounded to the wire dtype once (in chunks of at most max_rows rows, the
  size of a staging slot). The host update then sees `wire(sum of the step's gradients)`, as it sees
  `wire(g)` at one micro-batch per step: accumulation changes the summation, never the rounding.

Slot of a row = its order of first appearance in the step (fetch order, then position). The host worker
assigns slots when a fetch's ids have reached the host (`assign`) and stages them in `slots_host` [C]
(pinned), which cross to `slots_dev` [C] with the rows; padding positions (-1 ids) get the dummy slot U,
whose gradient row is never sent. `pushed` [U] marks slots that received a gradient: a row fetched but
never pushed (evaluation inside a step, a partial push) is not updated, as lazy AdamW requires.
`slot_of_dev` [N + 1] maps row id -> slot on the device for partial pushes with device ids (entry N is the
sink of -1 ids); it is written for the live fetch's rows before such a push and never read for others.

Sparse update (`update_mask`): each push's row mask [K] is added into `keep_dev` [U + 1] int32 by slot
(the masked rows' gradients arrive zeroed), so a union row is updated when any micro-batch of the step kept
it; the mask crosses with each chunk of gradients (`keep_dev > 0`, into the slot's `keep`) and the host
update skips the rest.

`StepUnion` is one layer's state; `UnionTraffic` is the half of `TransferScheduler` that moves it: slot
assignment on the host worker, pushes summed on the device, the one send per step and its host update.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from offload.fetch import check_subset

__all__ = ["StepUnion", "UnionTraffic"]


class StepUnion:
    """Union state of one layer (see module docstring). Host parts are allocated now, device parts on
    the first step with accumulation (`ensure`)."""

    def __init__(self, n_rows: int, width: int, update_mask: bool = False):
        self.n_rows, self.width, self.update_mask = n_rows, width, update_mask
        self.slot_of_host = np.full(n_rows, -1, dtype=np.int64)  # [N] row id -> slot in this step, -1
        self.ids_host = np.empty(0, dtype=np.int64)  # [U] union row ids in slot order
        self.pushed = np.zeros(0, dtype=np.bool_)  # [U] the slot received a gradient this step
        self.n = 0  # slots assigned in `step` (written by the host worker)
        self.step = -1
        self.capacity = 0  # U
        self.rows_dev: torch.Tensor | None = None  # [U + 1, W] wire: the step's rows (row caching only)
        self.grads_dev: torch.Tensor | None = None  # [U + 1, W] fp32: the step's summed gradients
        self.keep_dev: torch.Tensor | None = None  # [U + 1] int32: micro-batches that kept the row (update_mask)
        self.slot_of_dev: torch.Tensor | None = None  # [N + 1] int64 row id -> slot (partial pushes)
        self.pending = False  # grads_dev holds gradients of this step that have not crossed yet
        self.marked_by_worker = False  # a partial push with device ids: the worker marks its rows pushed

    @property
    def dummy(self) -> int:
        """The slot of padding positions: a row of rows_dev / grads_dev that is never sent."""
        return self.capacity

    def ensure(self, engine, capacity: int, wire_dtype: torch.dtype, cache_rows: bool) -> None:
        """Device buffers for `capacity` union rows (between steps; grows, never shrinks)."""
        capacity = min(capacity, self.n_rows)
        if capacity > self.capacity:
            self.slot_of_host[self.ids_host[: self.n]] = -1  # the previous step's union is over
            self.n, self.step = 0, -1
            self.capacity = capacity
            self.ids_host = np.empty(capacity, dtype=np.int64)
            self.pushed = np.zeros(capacity, dtype=np.bool_)
            self.grads_dev = engine.alloc_device((capacity + 1, self.width), torch.float32)
            self.keep_dev = engine.alloc_device((capacity + 1,), torch.int32) if self.update_mask else None
            self.rows_dev = None
            self.slot_of_dev = None
        if cache_rows and self.rows_dev is None:
            self.rows_dev = engine.alloc_device((self.capacity + 1, self.width), wire_dtype)
        if self.slot_of_dev is None:
            self.slot_of_dev = engine.alloc_device((self.n_rows + 1,), torch.int64)

    def assign(self, step: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Host worker: slots of a fetch part's valid ids [n] in `step`; returns (slots [n], the ids new to the
        union in their order [m], the slot of the first of them)."""
        if step != self.step:  # the first fetch of a new step: forget the previous step's union
            self.slot_of_host[self.ids_host[: self.n]] = -1
            self.pushed[: self.n] = False
            self.n, self.step = 0, step
        slots = self.slot_of_host[ids]  # [n]
        new = slots < 0
        new_ids = ids[new]
        first, m = self.n, new_ids.shape[0]
        if first + m > self.capacity:
            raise RuntimeError(f"step union of {first + m} rows exceeds its capacity {self.capacity} "
                               "(accum_steps x live rows); begin_step(accum_steps) sizes it")
        fresh = np.arange(first, first + m, dtype=np.int64)
        slots[new] = fresh
        self.slot_of_host[new_ids] = fresh
        self.ids_host[first:first + m] = new_ids
        self.n = first + m
        return slots, new_ids, first


class UnionTraffic:
    """The step union's traffic for a TransferScheduler (see module docstring), given the scheduler's shared
    `offload.context.SchedulerContext` and its `offload.updates.UpdateRunner`."""

    def __init__(self, ctx, updates):
        self.ctx, self.updates = ctx, updates
        self.optimizers, self.engine, self.d2h_pool, self.worker = ctx.optimizers, ctx.engine, ctx.d2h_pool, ctx.worker
        self.meter, self.check, self.meter_copy = ctx.meter, ctx.check, ctx.meter_copy
        self.max_rows, self.wire_dtype, self.device = ctx.max_rows, ctx.wire_dtype, ctx.device
        self.width, self.wire_bytes, self.skip_waits = ctx.width, ctx.wire_bytes, ctx.skip_waits

    def assign_slots(self, st, h, n: int, marker) -> tuple:
        """Host worker, accumulation: slots of the part's valid ids in the step union, staged in slots_host
        (padding -> the union's dummy slot) and sent to slots_dev; returns (ids new to the union, first slot)."""
        off, end, un = h.offset, h.n_rows, st.union
        slots, new_ids, first = un.assign(h.step, st.ids_host[off:off + n].numpy())
        if st.last_slots_h2d is not None and "slots" not in self.skip_waits:
            # protects slots_host: the previous slots H2D, queued behind compute, may not have read it yet
            st.last_slots_h2d.wait()
        st.slots_host[off:off + n].copy_(torch.from_numpy(slots))
        st.slots_host[off + n:end] = un.dummy
        if st.slots_dev is not st.slots_host:
            meta = (h.step, h.micro_batch, st.index)
            h.slots_event = st.last_slots_h2d = self.engine.h2d(
                st.slots_host[off:end], st.slots_dev[off:end], rows=end - off, after=marker,
                on_done=lambda ev: self.meter_copy(ev, "ids", meta))
        return new_ids, first

    def push(self, st, h, ids, grads, full: bool, *, step: int, micro_batch: int, last: bool, keep=None) -> None:
        """push_grads under accumulation: add the push's gradients [K, W] to the layer's step union on the
        device (fp32); they cross once, at the layer's last push of the step (`last`) or at finish_step.
        `keep` [K] bool on the device (a sparse update's mask; None: all kept) is ORed into the union."""
        un, layer = st.union, st.index
        for p in h.parts():
            if p.slots_event is not None and "slots" not in self.skip_waits:
                p.slots_event.wait_device()  # protects the slot lookups: the part's slots H2D must have landed
        if full and h.base is None:  # the fetch's own ids: its slots, padding -> the dummy slot
            slots_dev = st.slots_dev[: h.n_rows]
            un.pushed[st.slots_host[: h.n_valid].numpy()] = True
        elif ids.device.type == "cpu":  # a subset, checked in push_is_full
            slots = un.slot_of_host[ids.numpy()]
            un.pushed[slots] = True
            slots_dev = torch.from_numpy(slots).to(self.device)  # small; partial pushes with host ids only
        else:  # a subset given by device ids: slots from the device map, written for the live rows first
            for p in h.parts():
                pid = p._ids_dev  # [n_p] this part's ids on the device (-1 padding -> the map's sink entry)
                un.slot_of_dev.index_copy_(0, torch.where(pid >= 0, pid, un.n_rows), st.slots_dev[p.offset:p.n_rows])
            slots_dev = un.slot_of_dev.index_select(0, ids)
            self._check_push(st, h, ids, (step, micro_batch, layer))  # the worker checks them, marks them pushed
            un.marked_by_worker = True
        un.grads_dev.index_add_(0, slots_dev, grads.float())  # the step's fp32 sum, on the compute stream
        if un.keep_dev is not None:
            kept = (torch.ones(grads.shape[0], dtype=torch.int32, device=grads.device) if keep is None
                    else keep.to(torch.int32))  # [K]
            un.keep_dev.index_add_(0, slots_dev.to(grads.device), kept)
        un.pending = True
        self.updates.end_chain(st)  # an owed staleness-1 update is queued before the step's gradients (as at fetch)
        self.updates.grads_pushed(layer, step)
        if last:
            self.send(st, step=step, micro_batch=micro_batch, last=True)

    def _check_push(self, st, h, ids, meta) -> None:
        """A partial push with device ids: the ids cross to the host, where the worker checks them against the
        live fetch (an error surfaces at the next call) and marks their slots pushed."""
        k = ids.numel()
        slot = self.d2h_pool.acquire(self.check)
        ev = self.engine.d2h(ids, slot.ids[:k], rows=k, after=self.engine.mark_compute(),
                             on_done=lambda e: self.meter_copy(e, "ids", meta))
        reader, live = threading.Event(), h.n_rows
        st.ids_reader = reader

        def task():
            try:
                ev.wait()  # protects the check: the pushed ids' D2H must have landed
                check_subset(slot.ids[:k], st.ids_host[:live], st.index)
                st.union.pushed[st.union.slot_of_host[slot.ids[:k].numpy()]] = True
            finally:
                reader.set()  # ids_host may be refilled by the layer's next fetch
                self.d2h_pool.release(slot)
        self.worker.submit(task, st.index)

    def send(self, st, *, step: int, micro_batch: int, last: bool) -> None:
        """The layer's summed gradients of the step cross once, rounded to the wire dtype once, in chunks of
        at most max_rows rows (a staging slot): the rows pushed this step. Where a partial push gave device
        ids, which rows were pushed is known only once the worker has checked them: the whole union then
        crosses and rows never pushed (zeros) are left out on the host, never updated."""
        un, layer = st.union, st.index
        by_worker, un.marked_by_worker, un.pending = un.marked_by_worker, False, False
        n = un.n  # the union's size: every fetch of the step has been gathered (push_grads waited for it)
        keep = un.pushed[:n]
        if by_worker or keep.all():
            sel, ids_np = None, un.ids_host[:n].copy()
        else:  # the pushed rows only (a lookahead prefetch fetched rows nobody needed)
            sel = np.flatnonzero(keep)  # [k] slots; host-known: full pushes and host-id partial pushes
            ids_np = un.ids_host[sel]
        k_all = ids_np.shape[0]
        fused = last and k_all > 0 and self.updates.fuses()
        hp = self.updates.fuse(layer, step) if fused else None
        if k_all:
            if sel is None:
                grads = un.grads_dev[:n]
            else:  # a small index copy (pageable on CUDA): host-id partial pushes only
                grads = un.grads_dev.index_select(0, torch.from_numpy(sel).to(self.device))
            src = grads.to(self.wire_dtype, copy=True)  # [k, W] the one rounding of the step's sum
            un.grads_dev[:n].zero_()  # for the next step (stream order: after the cast has read it)
            keep_src = None
            if un.keep_dev is not None:  # [k] bool: kept by some micro-batch (a new tensor, then zeroed)
                kd = un.keep_dev[:n] if sel is None else un.keep_dev.index_select(
                    0, torch.from_numpy(sel).to(self.device))
                keep_src = kd > 0
                un.keep_dev[:n].zero_()
            ids_all = torch.from_numpy(ids_np)
        meta = (step, micro_batch, layer)
        for c0 in range(0, k_all, self.max_rows):
            c1 = min(k_all, c0 + self.max_rows)
            k = c1 - c0
            slot = self.d2h_pool.acquire(self.check)  # backpressure
            slot.ids[:k].copy_(ids_all[c0:c1])
            ev = self.engine.d2h(src[c0:c1], slot.rows[:k], rows=k, after=self.engine.mark_compute(),
                                 on_done=lambda e: self.meter_copy(e, "d2h", meta))
            keep_ev = None if keep_src is None else self.engine.d2h(
                keep_src[c0:c1], slot.keep[:k], rows=k, after=self.engine.mark_compute(),
                on_done=lambda e: self.meter_copy(e, "ids", meta))
            rows = (c0, c1) if by_worker else None  # the worker reads un.pushed for them when it runs
            self.worker.submit(lambda slot=slot, ev=ev, k=k, rows=rows, final=c1 == k_all, keep_ev=keep_ev:
                               self._task(st, slot, ev, k, step, rows, hp, final, keep_ev), layer)
        if not k_all:
            # nothing crosses, but like any push it orders the layer: a parked staleness-1 update of the previous
            # step runs before this step's update (and before a global norm reads its scale)
            self.worker.submit(lambda: None, layer)
        if last and not fused:
            self.updates.grads_complete(layer, step)

    def _task(self, st, slot, ev, n: int, step: int, slots, fused, final: bool, keep_ev=None) -> None:
        """One chunk of a step union's gradients, from the staging slot into the layer's optimizer,
        accumulated or (`fused` hyper-parameters) applied at once. `slots` = (c0, c1): the chunk is union
        slots [c0, c1), of which only those marked pushed (by the worker's checks, all run before this
        task) are applied. `keep_ev`: the D2H of the chunk's sparse-update mask into slot.keep (None: no mask)."""
        try:
            if "d2h" not in self.skip_waits:
                ev.wait()  # protects the slot: the grads' D2H must have landed before we read it
            ids, rows = slot.ids[:n], slot.rows[:n]
            kept = None
            if keep_ev is not None:
                keep_ev.wait()  # protects the mask: its D2H must have landed before we read it
                kept = slot.keep[:n]
            if slots is not None:
                keep = st.union.pushed[slots[0]:slots[1]]
                if not keep.all():
                    mask = torch.from_numpy(keep.copy())
                    ids, rows = ids[mask], rows[mask]
                    kept = None if kept is None else kept[mask]
            if fused is not None:
                self.updates.fused_update(st.index, step, fused, ids, rows, final=final, keep=kept)
                return
            t0 = time.perf_counter()
            self.optimizers[st.index].accumulate(ids, rows, *(() if kept is None else (kept,)))
            self.meter.record_cpu(step=step, layer=st.index, op="accumulate", rows=ids.shape[0],
                                  nbytes=ids.shape[0] * self.width * (self.wire_bytes + 8), start=t0,
                                  end=time.perf_counter())
        finally:
            self.d2h_pool.release(slot)

