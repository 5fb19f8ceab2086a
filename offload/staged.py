"""StagedFetch: rows down through the host, the default fetch of `TransferScheduler`.

For one fetch part of one layer: the ids reach the host (`LayerState.stage_ids`: a D2H of device ids, or
host ids copied in place), then the host worker waits for them, counts the valid prefix (ids end with -1
padding), gathers those rows from the RowStore into a staging slot of the H2D pool (fp32 master rows cast
to the wire dtype by the numba kernel) and issues the H2D into the layer's `rows_dev` (or, under gradient
accumulation with row caching, only the rows new to the step union, into the union's rows). The slot goes
back to the pool when the copy has read it. Nothing here makes the caller wait but a full slot pool
(backpressure); `FetchHandle.wait()` is where the rows are awaited. With device flags (`offload.flags`, the
default where the engine has them) each part gets its layer's next flag value here, the worker queues the
flag's write behind the part's copies, and `wait()` makes the device wait for it: the caller's thread never
waits for the gather (no lockstep per layer). Without flags `wait()` waits for the gather on the caller's
thread, then for the copy on the device.
"""

from __future__ import annotations

import time

import torch

from offload.fetch import FetchHandle, LayerState, valid_prefix

__all__ = ["StagedFetch"]


class StagedFetch:
    """Fetch parts through the H2D staging pool (see module docstring)."""

    def __init__(self, ctx, link, union):
        self.ctx, self.link, self.union = ctx, link, union  # SchedulerContext, FetchLink, UnionTraffic

    def start_part(self, st: LayerState, ids, n: int, base: FetchHandle | None, key: tuple[int, int], *,
                   accumulating: bool, cache_rows: bool) -> FetchHandle:
        """Issue one part of `st`'s live fetch: ids [n] (+ padding) of (step, micro-batch) `key`, after `base`."""
        ctx = self.ctx
        slot = ctx.h2d_pool.acquire(ctx.check)  # backpressure: blocks while every slot is busy
        marker = ctx.engine.mark_compute()  # H2D into rows_dev waits for compute issued so far
        meta = (*key, st.index)
        h = st.stage_ids(self.link, ctx.engine, ids, n, base, marker, key,
                         lambda ev: ctx.meter_copy(ev, "ids", meta))
        h.in_union, h.staged = accumulating, True
        if accumulating and cache_rows:
            h.union_rows = st.union.rows_dev  # wait() takes the part's rows from the step union by slot
        if ctx.flags is not None:  # before the submit: a worker failure releases every value handed out
            h.flag_value = ctx.flags.next(st.index)
        st.handle = st.last_gather = h
        ctx.worker.submit(lambda: self._gather_task(st, h, slot, marker), st.index)
        return h

    def _gather_task(self, st: LayerState, h: FetchHandle, slot, marker) -> None:
        ctx = self.ctx
        off, end, first = h.offset, h.n_rows, 0
        union = h.in_union  # fixed at fetch (the caller may be in the next step by now)
        try:
            if h.ids_event is not None and h.ids_event.direction == "d2h":
                h.ids_event.wait()  # protects the gather from reading ids_host before the ids D2H landed
            n = h.n_valid = valid_prefix(st.ids_host[off:end])  # rows before the -1 padding
            ids = st.ids_host[off:off + n]  # [n] the rows to send
            if union:
                new_ids, first = self.union.assign_slots(st, h, n, marker)
                if h.union_rows is not None:  # rows sent earlier this step stay on the device: only new ones
                    ids = torch.from_numpy(new_ids)
            m = ids.numel()
            t0 = time.perf_counter()
            ctx.optimizers[st.index].store.gather(ids, slot.rows)
            ctx.meter.record_cpu(step=h.step, layer=st.index, op="gather", rows=m,
                                 nbytes=m * ctx.width * (4 + ctx.wire_bytes), start=t0, end=time.perf_counter())
        except BaseException:
            ctx.h2d_pool.release(slot)
            raise
        meta = (h.step, h.micro_batch, st.index)
        dst = st.union.rows_dev[first:first + m] if h.union_rows is not None else st.rows_dev[off:off + m]
        h.copy_event = ctx.engine.h2d(slot.rows[:m], dst, rows=m, after=marker,
                                      on_done=lambda ev: self._h2d_done(ev, slot, meta))
        if h.flag_value is not None:
            ctx.flags.signal(st.index, h.flag_value)  # queued behind this part's copies (slots, rows)
        h.gathered.set()

    def _h2d_done(self, ev, slot, meta) -> None:
        self.ctx.h2d_pool.release(slot)  # the H2D has read the slot: it may be refilled
        self.ctx.meter_copy(ev, "h2d", meta)
