"""GradPush: a layer's row gradients back to the host when a step has one micro-batch.

`TransferScheduler.push_grads` checks a push and, without gradient accumulation, hands it here: the
gradients are cast to the wire dtype on the device where needed (into the layer's `grads_dev`), copied
D2H into a staging slot of the D2H pool (with a sparse update's row mask beside them), and the host
worker then either accumulates them into the layer's SparseAdamW or, at the step's last micro-batch when
the update may run at once, applies the layer's fused row update straight from the slot (one pass, no
second read). A partial push given by device ids sends those ids too; the worker checks them against the
live fetch before anything is applied (an error surfaces at the scheduler's next call). Under gradient
accumulation pushes go to the step union instead (`offload.union.UnionTraffic`).
"""

from __future__ import annotations

import threading
import time

import torch

from offload.fetch import FetchHandle, LayerState, check_subset

__all__ = ["GradPush"]


class GradPush:
    """One push's gradients, D2H and host work (see module docstring)."""

    def __init__(self, ctx, updates):
        self.ctx, self.updates = ctx, updates  # SchedulerContext, UpdateRunner

    def send(self, st: LayerState, h: FetchHandle, ids, grads, full: bool, k: int, t0: float, *, step: int,
             micro_batch: int, last: bool, keep=None) -> None:
        """Send grads [K, W] of rows `ids` of live fetch `h` (`full`: its own ids); `t0`: when the caller
        began waiting (metered as blocked time up to the slot acquisition)."""
        ctx, layer = self.ctx, st.index
        if full and h.base is None:
            k = h.n_valid  # a padded fetch: only its valid rows' gradients cross back
        slot = ctx.d2h_pool.acquire(ctx.check)  # backpressure
        ctx.meter.record_blocked(step, t0, time.perf_counter())  # the caller's thread waited so long
        meta = (step, micro_batch, layer)
        ids_check = None
        if full:
            slot.ids[:k].copy_(st.ids_host[:k])
        elif ids.device.type == "cpu":
            slot.ids[:k].copy_(ids)  # checked by LayerState.push_is_full
        else:  # partial push with device ids: D2H them, the worker checks them against ids_host
            ids_ev = ctx.engine.d2h(ids, slot.ids[:k], rows=k, after=ctx.engine.mark_compute(),
                                    on_done=lambda e: ctx.meter_copy(e, "ids", meta))
            st.ids_reader = threading.Event()
            ids_check = (ids_ev, h.n_rows, st.ids_reader)
        src = self._grads_source(st, grads[:k], k)
        ev = ctx.engine.d2h(src, slot.rows[:k], rows=k, after=ctx.engine.mark_compute(),
                            on_done=lambda e: ctx.meter_copy(e, "d2h", meta))
        keep_ev = None if keep is None else ctx.engine.d2h(  # the mask crosses beside its gradients
            keep[:k], slot.keep[:k], rows=k, after=ctx.engine.mark_compute(),
            on_done=lambda e: ctx.meter_copy(e, "ids", meta))
        if src is not grads:
            st.last_d2h = ev
        self.updates.end_chain(st)  # an owed staleness-1 update is queued before the accumulation (as at fetch)
        if last and self.updates.fuses():
            hp = self.updates.fuse(layer, step)  # one pass from the staging slot: no accumulate, no 2nd pass
            ctx.worker.submit(lambda: self._task(st, slot, ev, k, step, ids_check, hp, keep_ev), layer)
            return
        self.updates.grads_pushed(layer, step)
        ctx.worker.submit(lambda: self._task(st, slot, ev, k, step, ids_check, None, keep_ev), layer)
        if last:
            self.updates.grads_complete(layer, step)

    def _grads_source(self, st: LayerState, grads, n: int) -> torch.Tensor:
        ctx = self.ctx
        if grads.dtype == ctx.wire_dtype and grads.is_contiguous():
            return grads  # copied as is (on CUDA, record_stream keeps its memory alive)
        if st.grads_dev is None:
            st.grads_dev = ctx.engine.alloc_device((ctx.max_rows, ctx.width), ctx.wire_dtype)
        if st.last_d2h is not None:
            # protects grads_dev: the previous D2H out of it must have read it before we overwrite it
            st.last_d2h.wait_device()
        st.grads_dev[:n].copy_(grads)  # cast to the wire dtype on the compute stream
        return st.grads_dev[:n]

    def _task(self, st: LayerState, slot, ev, n: int, step: int, ids_check=None, fused=None,
              keep_ev=None) -> None:
        """Gradients of one push, from the staging slot into the layer's optimizer: accumulated, or (`fused`
        = the update's hyper-parameters) applied at once by the layer's whole row update. `keep_ev`: the
        D2H of the push's row mask into slot.keep (a sparse update), None without one."""
        ctx = self.ctx
        try:
            if ids_check is not None:
                ids_ev, live, reader = ids_check
                try:
                    ids_ev.wait()  # protects the check: the pushed ids' D2H must have landed
                    check_subset(slot.ids[:n], st.ids_host[:live], st.index)
                finally:
                    reader.set()  # ids_host may be refilled by the layer's next fetch
            if "d2h" not in ctx.skip_waits:
                ev.wait()  # protects the slot: the grads' D2H must have landed before we read it
            keep = None
            if keep_ev is not None:
                keep_ev.wait()  # protects the mask: its D2H must have landed before we read it
                keep = slot.keep[:n]
            if fused is not None:
                self.updates.fused_update(st.index, step, fused, slot.ids[:n], slot.rows[:n], keep=keep)
                return
            t0 = time.perf_counter()
            ctx.optimizers[st.index].accumulate(slot.ids[:n], slot.rows[:n], *(() if keep is None else (keep,)))
            ctx.meter.record_cpu(step=step, layer=st.index, op="accumulate", rows=n,
                                 nbytes=n * ctx.width * (ctx.wire_bytes + 8), start=t0, end=time.perf_counter())
        finally:
            ctx.d2h_pool.release(slot)
