"""ZeroCopyFetch: rows read by the device straight from a pinned, device-mapped mirror of each store.

With `fetch_mode="zero_copy"` each RowStore gets a wire-dtype mirror [N, W] in pinned, device-mapped host
memory (`engine.alloc_mapped`; under torch.distributed the node's one shared mirror), kept equal to the
fp32 master rows by the row update in the same pass. A fetch part then reads its rows from the mirror by
the caller's ids on the copy stream (`engine.gather_mapped`): no ids round trip and no CPU gather before
the adapter can run, and no H2D staging pool. The ids still cross to the host asynchronously (push_grads
needs them); the host worker only counts the valid rows (and gives them union slots under accumulation),
waits for the device's read (a staleness-1 update queued behind it rewrites mirror rows) and meters it.
A fetch first waits until every update already queued for its layer has written the mirror
(`UpdateRunner.wait_applied`; staleness 0 never waits there, finish_step already did).
"""

from __future__ import annotations

import torch

from offload.fetch import FetchHandle, LayerState, valid_prefix

__all__ = ["ZeroCopyFetch"]


class ZeroCopyFetch:
    """Fetch parts read from the mapped mirrors (see module docstring); allocates the mirrors."""

    def __init__(self, ctx, link, union, updates):
        self.ctx, self.link, self.union, self.updates = ctx, link, union, updates
        self.mirrors_dev = [self._attach_mirror(opt.store) for opt in ctx.optimizers]  # [N, W] wire, device view

    def _attach_mirror(self, store) -> torch.Tensor:
        ctx = self.ctx
        shared = store.alloc_mirror(ctx.wire_dtype)  # a shared store: the node's one mirror; else None
        mirror_host, mirror_dev = ctx.engine.alloc_mapped((store.n_rows, store.width), ctx.wire_dtype, host=shared)
        store.attach_mirror(mirror_host, filled=shared is not None)  # [N, W] wire, equal to the master rows
        return mirror_dev

    def start_part(self, st: LayerState, ids, n: int, base: FetchHandle | None, key: tuple[int, int], *,
                   accumulating: bool, cache_rows: bool = False) -> FetchHandle:
        """Issue one part of `st`'s live fetch: the device reads rows `ids` [n] from the layer's mirror."""
        ctx = self.ctx
        if "mirror" not in ctx.skip_waits:
            # protects the read: an update of this layer already queued (staleness 1, or an earlier
            # micro-batch's) must have written the mirror rows first, as the FIFO worker orders staged gathers
            self.updates.wait_applied(st.index)
        marker = ctx.engine.mark_compute()  # the ids, and compute still reading rows_dev, come first
        meta = (*key, st.index)
        h = st.stage_ids(self.link, ctx.engine, ids, n, base, marker, key,
                         lambda ev: ctx.meter_copy(ev, "ids", meta))
        off = h.offset
        # host ids: their H2D into ids_dev was queued on the same copy stream, so it lands first
        h.copy_event = ctx.engine.gather_mapped(self.mirrors_dev[st.index], h._ids_dev,
                                                st.rows_dev[off:off + n], rows=n, after=marker)
        st.handle = st.last_gather = h
        h.in_union = accumulating
        ctx.worker.submit(lambda: self._mapped_task(st, h, marker), st.index)
        return h

    def _mapped_task(self, st: LayerState, h: FetchHandle, marker) -> None:
        """Host side of a zero-copy fetch part: count its valid rows (and give them union slots under
        accumulation), wait for the device's read, meter the rows that crossed."""
        ctx = self.ctx
        off, end = h.offset, h.n_rows
        if h.ids_event is not None and h.ids_event.direction == "d2h":
            h.ids_event.wait()  # protects the count: the ids D2H into ids_host must have landed
        n = h.n_valid = valid_prefix(st.ids_host[off:end])
        if h.in_union:
            self.union.assign_slots(st, h, n, marker)
        ev = h.copy_event
        ev.wait()  # protects the mirror: the device has read these rows before anything queued later runs
        ctx.meter.record_transfer(step=h.step, micro_batch=h.micro_batch, layer=st.index, direction="h2d",
                                  nbytes=n * ctx.width * ctx.wire_bytes, rows=n, start=ev.start_s,
                                  end=ev.end_s, engine=ctx.engine.name, pageable=False)
        h.gathered.set()
