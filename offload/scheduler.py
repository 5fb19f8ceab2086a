"""TransferScheduler: rows down, row gradients back, CPU updates, all asynchronous and metered.

Owns DESIGN.md "One training step". For each adapter layer (one SparseAdamW over one RowStore):

    fetch(l, ids)       ids -> host (ids_host), host worker gathers rows (wire dtype) into a staging
                        slot, H2D into the layer's rows_dev buffer; handle.wait() -> rows on device
    push_grads(l, ...)  grads cast to wire dtype on the device, D2H into a staging slot; the host
                        worker waits for it, accumulates into the layer's optimizer and, at the
                        accumulation boundary (last micro-batch), runs its step()
    finish_step()       staleness 0: returns when every update of the step is done
    fetch_more(l, ids)  appends rows to the layer's live fetch (a lookahead prefetch completed with only
                        the rows it missed); push_grads may then carry any subset of the live rows: rows
                        not pushed get no gradient and no update (lazy AdamW stays exact). Buffers hold
                        `max_live_rows` (default max_rows; 2 * max_rows fits a prefetch plus its misses)

The host worker is a single FIFO thread, so "a gather submitted after an update sees it" is the only
ordering rule needed. Staleness 1 (ZeRO-Offload's delayed parameter update), deterministic: the update
of layer l from step t is applied right after layer l's next fetch (its first of step t+1 normally) has
gathered its rows; `flush()` / `close()` apply what is pending. The worker parks that update and runs it
in idle time or, at the latest, before its next task for layer l (identical result: nothing else touches
the layer in between), so it stays off the critical path of the forward pass. Clipping: "none", "layer"
(scale min(1, max_norm / (||g_l|| + 1e-6)) per layer) or "global" (the norm of all layers' gradients of
the step, summed in layer order on the host in finish_step; the updates then start there: a documented
cost). Staging slots and device buffers come from fixed pools; a full pool blocks the caller. A worker
exception is re-raised in the caller at the next call with its original traceback.

Zero-copy (`zero_copy=True`, MeftConfig.fetch_mode="zero_copy"): each store gets a wire-dtype mirror in
pinned, device-mapped host memory (`engine.alloc_mapped`), kept by the row update in the same pass as
the fp32 master. `fetch` then reads the rows straight from the mirror by the caller's ids on the copy
stream (`engine.gather_mapped`): no ids round trip and no CPU gather before the adapter can run. The
ids still cross to the host asynchronously (push_grads needs them); the host worker only counts the
valid rows and waits for the read before a staleness-1 update may rewrite them. A fetch waits until every
update already queued for its layer has written the mirror (`UpdatePolicy.wait_applied`: staleness 0
never waits there, finish_step already did). No H2D staging pool is allocated.

Data parallel (`process_group`, torch.distributed, staleness 0): each rank fetches and pushes its own rows;
at finish_step every layer's pending gradients are averaged across ranks over the union of their rows
(`offload.collective.RowGradReducer`) and every rank applies the same update: identical replicas. Stores
shared by the ranks of a node (`RowStore(..., node=...)`, one host copy per node): each rank of the node
updates the rows it owns, then a node barrier (`updates.UpdatePolicy`); zero-copy mirrors are shared too.

Gradient accumulation (accum_steps > 1): each layer's rows and gradients cross once per step, for the
union of its micro-batches' rows (`offload.union.StepUnion`): rows already sent this step are taken
from the device's copy of the union (staleness 0, staged fetches), and pushes are summed on the device
in fp32 and cross once, rounded to the wire dtype once, at the layer's last push (or finish_step).

Sparse update (`update_mask=True`, MeftConfig.sparse_update > 0): `push_grads(..., keep=)` carries a
fixed-shape per-row mask [K] bool on the device with the gradients. Masked rows' gradients are zeroed on
the device; the mask crosses D2H beside them (into the staging slot's `keep`), and the host update skips
those rows whole (`SparseAdamW.step_rows(keep=)` / `accumulate(keep=)`): no pending gradient, no moment
or step-count change. Under accumulation the step union ORs the micro-batches' masks on the device
(a row is updated when any micro-batch kept it, with the sum of the gradients of those that did).

Composed of: `fetch.LayerState` / `fetch.FetchHandle` (live rows and handles, linked back through a
`FetchLink`), `staging.SlotPool` (staging slots), `worker.HostWorker` (the host thread),
`updates.UpdatePolicy` (staleness, clipping, parked updates) and `union.UnionTraffic` (rows and gradients
under accumulation). Implements `protocol.RowScheduler`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from offload.collective import RowGradReducer
from offload.engine import CopyEngine, make_engine
from offload.fetch import (
    FetchHandle,
    FetchLink,
    LayerState,
    check_extend,
    check_grads,
    check_ids,
    check_keep,
    check_live_rows,
    check_subset,
    valid_prefix,
)
from offload.meter import TrafficMeter
from offload.node import shared_node
from offload.protocol import check_scheduler_args
from offload.staging import SlotPool, check_n_slots
from offload.steps import StepClock, check_layer
from offload.union import StepUnion, UnionTraffic
from offload.updates import UpdatePolicy, check_update_args
from offload.worker import HostWorker, numba_threads_setter, threads_left_for_kernels, wait_for

__all__ = ["TransferScheduler", "FetchHandle"]


class TransferScheduler:
    """See the module docstring; implements `offload.protocol.RowScheduler`."""
    def __init__(self, optimizers: Sequence, *, device="cpu", engine: CopyEngine | None = None,
                 wire_dtype=torch.bfloat16, max_rows: int, n_slots: int = 2, staleness: int = 0,
                 clip: str = "none", max_norm: float = 1.0, meter: TrafficMeter | None = None,
                 host_threads: int | None = None, max_live_rows: int | None = None, timing: bool = False,
                 zero_copy: bool = False, process_group=None, update_mask: bool = False):
        self._closed = True  # until fully constructed
        self.optimizers = list(optimizers)
        check_scheduler_args(self.optimizers, wire_dtype, max_rows, staleness, clip, max_norm)
        check_n_slots(n_slots)
        reducer = None if process_group is None else RowGradReducer(process_group)
        if reducer is not None and reducer.world == 1:
            reducer = None  # one rank: nothing to combine
        check_update_args(staleness, clip, max_norm, data_parallel=reducer is not None)
        node = shared_node(self.optimizers, data_parallel=reducer is not None)
        if zero_copy not in (True, False):
            raise ValueError(f"zero_copy={zero_copy!r} must be True or False")
        if update_mask not in (True, False):
            raise ValueError(f"update_mask={update_mask!r} must be True or False")
        self.update_mask = update_mask  # push_grads may carry a sparse update's row mask (`keep`)
        if host_threads is None and torch.device(device).type == "cuda":
            host_threads = threads_left_for_kernels(engine_threads=2)  # the CUDA engine's two watchers
        init = None if host_threads is None else numba_threads_setter(host_threads)
        live_rows = check_live_rows(max_live_rows, max_rows)
        self.device = torch.device(device)
        self._own_engine = engine is None
        self.engine = make_engine(self.device, timing=timing) if engine is None else engine
        if self.engine.device.type != self.device.type:
            raise ValueError(f"engine {self.engine!r} copies to {self.engine.device}, but device={device!r}; "
                             "pass a matching engine or leave engine=None")
        self.width = self.optimizers[0].store.width
        self.wire_dtype, self.max_rows = wire_dtype, max_rows
        self.meter = TrafficMeter() if meter is None else meter
        if reducer is not None:
            reducer.meter = self.meter
        on_host = self.device.type == "cpu"
        self.layers = [LayerState(i, self.engine, live_rows, self.width, wire_dtype, on_host)
                       for i in range(len(self.optimizers))]
        for st, o in zip(self.layers, self.optimizers):
            st.union = StepUnion(o.store.n_rows, self.width, update_mask=update_mask)
        self._accumulating = False  # this step has several micro-batches: rows and gradients go by the step union
        self._cache_rows = staleness == 0 and not zero_copy  # the union also keeps the step's rows on the device
        self.zero_copy = zero_copy
        # rows down: staging slots, or (zero-copy) each store's mirror [N, W] wire, as the device sees it
        self.h2d_pool = None if zero_copy else SlotPool(self.engine, n_slots, max_rows, self.width, wire_dtype)
        self._mirrors_dev = [self._attach_mirror(opt.store) for opt in self.optimizers] if zero_copy else []
        self.d2h_pool = SlotPool(self.engine, n_slots, max_rows, self.width, wire_dtype, keep=update_mask)  # grads back
        self.worker = HostWorker(init=init)
        self._link = FetchLink(self._check, self._end_chain, self.meter.record_blocked)
        self._test_skip_waits = self._link.skip_waits  # test hook: add "h2d" / "d2h" to disable that wait
        self._wire_bytes = torch.empty((), dtype=wire_dtype).element_size()
        state_bytes = torch.empty((), dtype=self.optimizers[0].store.state_dtype).element_size()
        self.updates = UpdatePolicy(self.optimizers, self.worker, self.meter, self._check, staleness=staleness,
                                    clip=clip, max_norm=max_norm, width=self.width, state_bytes=state_bytes,
                                    reducer=reducer, node=node, skip_waits=self._link.skip_waits)
        self.clock = StepClock()
        self.union_traffic = UnionTraffic(self.optimizers, self.engine, self.d2h_pool, self.worker, self.updates,
                                          self.meter, self._link, self._check, self._meter_copy, self._end_chain,
                                          max_rows=max_rows, wire_dtype=wire_dtype, device=self.device)
        self._read_buf: torch.Tensor | None = None  # [>= R, width] fp32 host buffer of read_rows
        self._error_reported = False
        self._closed = False

    def _attach_mirror(self, store) -> torch.Tensor:
        shared = store.alloc_mirror(self.wire_dtype)  # a shared store: the node's one mirror; else None
        mirror_host, mirror_dev = self.engine.alloc_mapped((store.n_rows, store.width), self.wire_dtype, host=shared)
        store.attach_mirror(mirror_host, filled=shared is not None)  # [N, W] wire, equal to the master rows
        return mirror_dev

    @staticmethod
    def staging_bytes(n_layers: int, max_rows: int, width: int, wire_dtype: torch.dtype, n_slots: int = 2,
                      max_live_rows: int | None = None, zero_copy_rows: int = 0, update_mask: bool = False) -> int:
        """Host bytes the device reads or writes that this scheduler allocates (pinned, at exact size, on
        CUDA): two pools (H2D, D2H) of `n_slots` slots of rows [max_rows, width] + ids [max_rows], and each
        layer's ids and union-slots buffers [max_live_rows] int64; zero-copy (`zero_copy_rows` = rows per
        store > 0): no H2D pool, and each layer's mirror [zero_copy_rows, width] wire. The RAM check of
        `meft.wrap` and `meft plan` count exactly this. `update_mask`: the D2H slots also hold a row mask
        [max_rows] bool each (a sparse update)."""
        wire = torch.empty((), dtype=wire_dtype).element_size()
        live = max_rows if max_live_rows is None else max_live_rows
        pools = 1 if zero_copy_rows else 2
        mirrors = n_layers * zero_copy_rows * width * wire
        masks = n_slots * max_rows if update_mask else 0
        return pools * n_slots * max_rows * (width * wire + 8) + n_layers * live * 16 + mirrors + masks

    # ------------------------------------------------------------------------------ errors
    def _check(self) -> None:
        """Raise a worker's exception in the caller (once, original object and traceback)."""
        err = self.worker.error
        if err is None:
            return
        if not self._error_reported:
            self._error_reported = True
            raise err
        raise RuntimeError("TransferScheduler stopped after a worker error (raised earlier); close() it "
                           "and build a new one") from err

    def _entry(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"TransferScheduler.{what}: the scheduler is closed")
        self._check()

    # the step structure lives in the clock (offload.steps); these read it
    step = property(lambda self: self.clock.step)
    micro_batch = property(lambda self: self.clock.micro_batch)
    accum_steps = property(lambda self: self.clock.accum_steps)

    def _layer(self, layer) -> LayerState:
        return self.layers[check_layer(layer, len(self.layers))]

    # ------------------------------------------------------------------------------ steps
    def begin_step(self, accum_steps: int = 1) -> None:
        """Step counter += 1; the micro-batch counter restarts (micro-batch 0 begins implicitly)."""
        self._entry("begin_step")
        self.clock.begin_step(accum_steps)
        self.meter.set_step(self.step)
        self._accumulating = self.clock.accum_steps > 1
        if self._accumulating:  # device buffers of the step union: every live row of every micro-batch at most
            for st in self.layers:
                st.union.ensure(self.engine, self.clock.accum_steps * st.capacity, self.wire_dtype, self._cache_rows)

    def begin_micro_batch(self) -> None:
        """Start the next micro-batch (calling it before the first one is optional)."""
        self._entry("begin_micro_batch")
        self.clock.begin_micro_batch()

    # ------------------------------------------------------------------------------ fetch
    def fetch(self, layer: int, ids: torch.Tensor, *, extendable: bool = False) -> FetchHandle:
        """Start moving rows `ids` ([R] int64 unique sorted, any device) of `layer` to the device.

        `ids` may end with -1 padding (the unused slots of a fixed-shape routing): only the valid prefix
        is gathered and crosses to the device (the host counts it once the ids have reached it, so the
        caller never synchronises); `wait()` still returns [R, width], whose padding rows hold stale
        finite values the caller masks. Such a fetch is pushed back whole (its own ids tensor).

        `extendable=True` (a prefetch that `fetch_more` may complete): with staleness 1 the layer's
        delayed update then waits until this fetch ends (push_grads / release / finish_step) instead of
        following its gather, so rows added later are read from the same state as these."""
        self._entry("fetch")
        st = self._layer(layer)
        n = check_ids(ids, "fetch", self.max_rows, self.device)
        self.clock.need_step("fetch")
        h0 = st.handle
        if h0 is not None and h0.step == self.step and h0.micro_batch == self.micro_batch:
            raise ValueError(f"fetch: layer {layer} was already fetched in micro-batch {self.micro_batch} of "
                             f"step {self.step}; reuse that handle (recomputation must not fetch again), add "
                             "rows with fetch_more, or call handle.release() first")
        if self.updates.triggered(layer, self.step):
            raise ValueError(f"fetch: layer {layer} already received its last-micro-batch gradients in step "
                             f"{self.step} (its update is under way); fetch it in the next step")
        if st.handle is not None:
            st.handle.release()  # an earlier micro-batch's fetch without gradients
        if st.last_gather is not None:
            st.last_gather.wait_gathered()  # protects ids_host: the previous gathers still read it
        if st.ids_reader is not None:
            wait_for(st.ids_reader, self._check)  # protects ids_host: a push's subset check reads it
            st.ids_reader = None
        # a forward is issuing gathers: until its gradients come back, idle time runs no parked update
        # (DESIGN: at staleness 1 no update runs while the forward may be waiting on a gather)
        self.worker.hold_idle()
        h = self._start_part(st, ids, n, None)
        # staleness 1: the previous step's update, after this fetch's gathers
        h.owes_update = self.updates.take_pending(layer, self.step)
        if h.owes_update is not None and not extendable:
            self.updates.park(layer, *h.take_owed())  # right after this gather
        return h

    def fetch_more(self, layer: int, ids: torch.Tensor) -> FetchHandle:
        """Add rows `ids` ([M] int64 unique, M >= 1, none already live) to `layer`'s live fetch of this
        micro-batch; they land after the live rows. Returns the chain's handle: `wait()` -> rows
        [n0 + M, width] (the live rows first, then these), `ids_host` [n0 + M]. The chain holds at most
        `max_live_rows` rows (see `reserve_live_rows`); each part at most `max_rows`."""
        self._entry("fetch_more")
        st = self._layer(layer)
        m = check_ids(ids, "fetch_more", self.max_rows, self.device)
        self.clock.need_step("fetch_more")
        base = st.handle
        check_extend(base, m, layer, self.step, self.micro_batch, st.capacity, self.max_rows)
        return self._start_part(st, ids, m, base)

    def _start_part(self, st: LayerState, ids, n: int, base: FetchHandle | None) -> FetchHandle:
        if self.zero_copy:
            return self._start_mapped_part(st, ids, n, base)
        slot = self.h2d_pool.acquire(self._check)  # backpressure: blocks while every slot is busy
        marker = self.engine.mark_compute()  # H2D into rows_dev waits for compute issued so far
        meta = (self.step, self.micro_batch, st.index)
        h = st.stage_ids(self._link, self.engine, ids, n, base, marker, (self.step, self.micro_batch),
                         lambda ev: self._meter_copy(ev, "ids", meta))
        h.in_union = self._accumulating
        if self._accumulating and self._cache_rows:
            h.union_rows = st.union.rows_dev  # wait() takes the part's rows from the step union by slot
        st.handle = st.last_gather = h
        self.worker.submit(lambda: self._gather_task(st, h, slot, marker), st.index)
        return h

    def _start_mapped_part(self, st: LayerState, ids, n: int, base: FetchHandle | None) -> FetchHandle:
        """Zero-copy fetch part: the device reads the rows from the layer's mirror by the caller's ids."""
        if "mirror" not in self._link.skip_waits:
            # protects the read: an update of this layer already queued (staleness 1, or an earlier
            # micro-batch's) must have written the mirror rows first, as the FIFO worker orders staged gathers
            self.updates.wait_applied(st.index)
        marker = self.engine.mark_compute()  # the ids, and compute still reading rows_dev, come first
        meta = (self.step, self.micro_batch, st.index)
        h = st.stage_ids(self._link, self.engine, ids, n, base, marker, (self.step, self.micro_batch),
                         lambda ev: self._meter_copy(ev, "ids", meta))
        off = h.offset
        # host ids: their H2D into ids_dev was queued on the same copy stream, so it lands first
        h.copy_event = self.engine.gather_mapped(self._mirrors_dev[st.index], h._ids_dev,
                                                 st.rows_dev[off:off + n], rows=n, after=marker)
        st.handle = st.last_gather = h
        h.in_union = self._accumulating
        self.worker.submit(lambda: self._mapped_task(st, h, marker), st.index)
        return h

    def _mapped_task(self, st: LayerState, h: FetchHandle, marker) -> None:
        """Host side of a zero-copy fetch part: count its valid rows (and give them union slots under
        accumulation), wait for the device's read (a staleness-1 update queued behind this task rewrites
        mirror rows), meter the rows that crossed."""
        off, end = h.offset, h.n_rows
        if h.ids_event is not None and h.ids_event.direction == "d2h":
            h.ids_event.wait()  # protects the count: the ids D2H into ids_host must have landed
        n = h.n_valid = valid_prefix(st.ids_host[off:end])
        if h.in_union:
            self.union_traffic.assign_slots(st, h, n, marker)
        ev = h.copy_event
        ev.wait()  # protects the mirror: the device has read these rows before anything queued later runs
        self.meter.record_transfer(step=h.step, micro_batch=h.micro_batch, layer=st.index, direction="h2d",
                                   nbytes=n * self.width * self._wire_bytes, rows=n, start=ev.start_s,
                                   end=ev.end_s, engine=self.engine.name, pageable=False)
        h.gathered.set()

    def reserve_live_rows(self, rows: int) -> None:
        """Size each layer's live buffers (rows_dev [rows, width], ids) for `rows` >= max_rows rows, so a
        fetch plus `fetch_more` fits (2 * max_rows for a lookahead prefetch plus its misses: the device
        row buffers then take twice the memory). Between steps only; it waits for the host worker."""
        rows = check_live_rows(rows, self.max_rows)
        self._entry("reserve_live_rows")
        self.clock.check_between_steps("reserve_live_rows")
        self.worker.barrier(self._check)  # gathers read st.ids_host: none may still run
        for st in self.layers:
            if st.capacity < rows:
                st.alloc(self.engine, rows, self.width, self.wire_dtype, self.device.type == "cpu")
                st.last_gather = st.handle = None

    def _gather_task(self, st: LayerState, h: FetchHandle, slot, marker) -> None:
        off, end, first = h.offset, h.n_rows, 0
        union = h.in_union  # fixed at fetch (the caller may be in the next step by now)
        try:
            if h.ids_event is not None and h.ids_event.direction == "d2h":
                h.ids_event.wait()  # protects the gather from reading ids_host before the ids D2H landed
            n = h.n_valid = valid_prefix(st.ids_host[off:end])  # rows before the -1 padding
            ids = st.ids_host[off:off + n]  # [n] the rows to send
            if union:
                new_ids, first = self.union_traffic.assign_slots(st, h, n, marker)
                if h.union_rows is not None:  # rows sent earlier this step stay on the device: only new ones
                    ids = torch.from_numpy(new_ids)
            m = ids.numel()
            t0 = time.perf_counter()
            self.optimizers[st.index].store.gather(ids, slot.rows)
            self.meter.record_cpu(step=h.step, layer=st.index, op="gather", rows=m,
                                  nbytes=m * self.width * (4 + self._wire_bytes), start=t0,
                                  end=time.perf_counter())
        except BaseException:
            self.h2d_pool.release(slot)
            raise
        meta = (h.step, h.micro_batch, st.index)
        dst = st.union.rows_dev[first:first + m] if h.union_rows is not None else st.rows_dev[off:off + m]
        h.copy_event = self.engine.h2d(slot.rows[:m], dst, rows=m, after=marker,
                                       on_done=lambda ev: self._h2d_done(ev, slot, meta))
        h.gathered.set()

    def _h2d_done(self, ev, slot, meta) -> None:
        self.h2d_pool.release(slot)  # the H2D has read the slot: it may be refilled
        self._meter_copy(ev, "h2d", meta)

    def _meter_copy(self, ev, direction: str, meta) -> None:
        step, mb, layer = meta
        self.meter.record_transfer(step=step, micro_batch=mb, layer=layer, direction=direction,
                                   nbytes=ev.nbytes, rows=ev.rows, start=ev.start_s, end=ev.end_s,
                                   engine=self.engine.name, pageable=ev.pageable)

    # ------------------------------------------------------------------------------ gradients
    def push_grads(self, layer: int, ids: torch.Tensor, grads: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Send `grads` ([K, width], any float dtype, on the device) for rows `ids` ([K]) of the layer's
        live fetch back, and end that fetch. `ids`: the fetch's ids (handle.ids_dev or the tensor given to
        fetch), or a subset of the live rows (a fetch_more chain's included) in any order, each once:
        rows fetched but not pushed get no gradient and no update. Host ids are checked here; device
        ids of a partial push (CUDA) are checked by the host worker (an error surfaces at the next call).
        `keep` ([K] bool beside `grads`; needs `update_mask=True`): a sparse update's per-row mask; rows with
        False get no update at all (see the module docstring). None: every pushed row is updated."""
        self._entry("push_grads")
        self.worker.release_idle()  # backward has begun: parked updates may use idle time again
        st = self._layer(layer)
        h = st.handle
        if h is None or h.step != self.step or h.micro_batch != self.micro_batch:
            raise ValueError(f"push_grads: layer {layer} has no live fetch in micro-batch {self.micro_batch} "
                             f"of step {self.step}; call fetch({layer}, ids) first (once per micro-batch)")
        k = check_ids(ids, "push_grads", self.max_rows, self.device)
        check_grads(grads, k, self.width, layer, self.device)
        if keep is not None:
            keep = check_keep(keep, k, self.update_mask, grads.device)
            # masked rows' gradients never reach a sum (the step union) or a norm (clipping); where, not a
            # product: 0 * inf = nan
            grads = torch.where(keep[:, None], grads, 0.0)
        t0 = time.perf_counter()
        full = st.push_is_full(h, ids)  # else a checked subset (host ids)
        h.wait_gathered()  # protects the ids copy below: ids_host must hold this fetch's ids
        if self._accumulating:
            self.union_traffic.push(st, h, ids, grads, full, step=self.step, micro_batch=self.micro_batch,
                                    last=self.clock.last_micro_batch, keep=keep)
            self.meter.record_blocked(self.step, t0, time.perf_counter())
            return
        if full and h.base is None:
            k = h.n_valid  # a padded fetch: only its valid rows' gradients cross back
        slot = self.d2h_pool.acquire(self._check)  # backpressure
        self.meter.record_blocked(self.step, t0, time.perf_counter())  # the caller's thread waited so long
        meta = (self.step, self.micro_batch, st.index)
        ids_check = None
        if full:
            slot.ids[:k].copy_(st.ids_host[:k])
        elif ids.device.type == "cpu":
            slot.ids[:k].copy_(ids)  # checked by _push_is_full
        else:  # partial push with device ids: D2H them, the worker checks them against ids_host
            ids_ev = self.engine.d2h(ids, slot.ids[:k], rows=k, after=self.engine.mark_compute(),
                                     on_done=lambda e: self._meter_copy(e, "ids", meta))
            st.ids_reader = threading.Event()
            ids_check = (ids_ev, h.n_rows, st.ids_reader)
        src = self._grads_source(st, grads[:k], k)
        ev = self.engine.d2h(src, slot.rows[:k], rows=k, after=self.engine.mark_compute(),
                             on_done=lambda e: self._meter_copy(e, "d2h", meta))
        keep_ev = None if keep is None else self.engine.d2h(  # the mask crosses beside its gradients
            keep[:k], slot.keep[:k], rows=k, after=self.engine.mark_compute(),
            on_done=lambda e: self._meter_copy(e, "ids", meta))
        if src is not grads:
            st.last_d2h = ev
        self._end_chain(st)  # an owed staleness-1 update is queued before the accumulation (as at fetch)
        step = self.step
        if self.clock.last_micro_batch and self.updates.fuses():
            hp = self.updates.fuse(layer, step)  # one pass from the staging slot: no accumulate, no 2nd pass
            self.worker.submit(lambda: self._accumulate_task(st, slot, ev, k, step, ids_check, hp, keep_ev), st.index)
            return
        self.updates.grads_pushed(layer, self.step)
        self.worker.submit(lambda: self._accumulate_task(st, slot, ev, k, step, ids_check, None, keep_ev), st.index)
        if self.clock.last_micro_batch:
            self.updates.grads_complete(layer, step)

    def _end_chain(self, st: LayerState) -> None:
        """End the layer's live fetch (all parts); queue the staleness-1 update it held back, if any."""
        root = st.end_chain()
        if root is not None:
            self.updates.park(st.index, *root.take_owed())

    def _grads_source(self, st: LayerState, grads, n: int) -> torch.Tensor:
        if grads.dtype == self.wire_dtype and grads.is_contiguous():
            return grads  # copied as is (on CUDA, record_stream keeps its memory alive)
        if st.grads_dev is None:
            st.grads_dev = self.engine.alloc_device((self.max_rows, self.width), self.wire_dtype)
        if st.last_d2h is not None:
            # protects grads_dev: the previous D2H out of it must have read it before we overwrite it
            st.last_d2h.wait_device()
        st.grads_dev[:n].copy_(grads)  # cast to the wire dtype on the compute stream
        return st.grads_dev[:n]

    def _accumulate_task(self, st: LayerState, slot, ev, n: int, step: int, ids_check=None, fused=None,
                         keep_ev=None) -> None:
        """Gradients of one push, from the staging slot into the layer's optimizer: accumulated, or (`fused`
        = the update's hyper-parameters) applied at once by the layer's whole row update. `keep_ev`: the
        D2H of the push's row mask into slot.keep (a sparse update), None without one."""
        try:
            if ids_check is not None:
                ids_ev, live, reader = ids_check
                try:
                    ids_ev.wait()  # protects the check: the pushed ids' D2H must have landed
                    check_subset(slot.ids[:n], st.ids_host[:live], st.index)
                finally:
                    reader.set()  # ids_host may be refilled by the layer's next fetch
            if "d2h" not in self._link.skip_waits:
                ev.wait()  # protects the slot: the grads' D2H must have landed before we read it
            keep = None
            if keep_ev is not None:
                keep_ev.wait()  # protects the mask: its D2H must have landed before we read it
                keep = slot.keep[:n]
            if fused is not None:
                self.updates.fused_update(st.index, step, fused, slot.ids[:n], slot.rows[:n], keep=keep)
                return
            t0 = time.perf_counter()
            self.optimizers[st.index].accumulate(slot.ids[:n], slot.rows[:n], *(() if keep is None else (keep,)))
            self.meter.record_cpu(step=step, layer=st.index, op="accumulate", rows=n,
                                  nbytes=n * self.width * (self._wire_bytes + 8), start=t0,
                                  end=time.perf_counter())
        finally:
            self.d2h_pool.release(slot)

    # ------------------------------------------------------------------------------ step end
    def finish_step(self) -> None:
        """End the step: trigger remaining updates; staleness 0 waits until all of them are done."""
        self._entry("finish_step")
        self.clock.check_in_step("finish_step")
        self.worker.release_idle()  # forwards without backward (evaluation inside a step) end here
        for st in self.layers:
            if st.handle is not None:
                st.handle.release()  # fetches without gradients; queues an update a prefetch held back
            if st.union.pending:  # pushed in an earlier micro-batch only: its gradients cross now
                if st.last_gather is not None:
                    st.last_gather.wait_gathered()  # protects the union's size: later fetches may still gather
                self.union_traffic.send(st, step=self.step, micro_batch=self.micro_batch, last=False)
        self.updates.end_step(self.step)
        self.clock.finish_step()
        self.updates.settle()

    def flush(self) -> None:
        """Apply every pending (staleness 1) update now and wait for all host work to finish."""
        self._entry("flush")
        for st in self.layers:
            root = None if st.handle is None else st.handle.parts()[0]
            if root is not None and root.owes_update is not None:
                self.updates.park(st.index, *root.take_owed())  # a live prefetch's held-back update
            self.updates.submit_pending(st.index, self.step)
        self.updates.drain()

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def read_rows(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` ([R] int64, any device) of `layer` as they are in the store now: [R, width] fp32 on
        the compute device, outside the step machinery (inference; nothing is metered). Pending
        staleness-1 updates are not applied: call `flush()` first (between steps) for current rows.
        On a CPU device the result is a view of a buffer that the next read_rows call overwrites.
        -1 ids (unused routing slots) read row 0: the caller masks them. This path synchronises (the ids
        go to the host first); inference with the rows resident on the device does not use it."""
        self._entry("read_rows")
        store = self.optimizers[self._layer(layer).index].store
        n = ids.numel()
        if self._read_buf is None or self._read_buf.shape[0] < n:
            self._read_buf = torch.empty(max(n, self.max_rows), store.width)  # [>= R, width] fp32
        return store.gather(ids.cpu().clamp(min=0), self._read_buf).to(self.device)

    def sync_to_host(self) -> None:
        """Nothing to do: the RowStores are the master copy (`flush()` applies pending updates)."""
    def load_from_host(self) -> None:
        """Nothing to do: rows are read from the RowStores at every fetch."""
    # ------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Apply pending updates (unless a worker failed), stop the threads. Idempotent, never hangs."""
        if self._closed:
            return
        try:
            if self.worker.error is None:
                self.flush()
        finally:
            self._closed = True
            self.worker.stop()
            if self._own_engine:
                self.engine.close()
        if not self._error_reported:
            self._check()  # a worker error nobody has seen yet is raised, never swallowed

    def __enter__(self) -> TransferScheduler:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the exception already propagating is the one to see
            pass

    def stats(self) -> dict:
        """Pool usage (backpressure) and host queue length."""
        h2d = self.h2d_pool  # None with zero-copy (rows come from the mirrors)
        return {"h2d_peak_slots": h2d.peak_in_use if h2d else 0, "d2h_peak_slots": self.d2h_pool.peak_in_use,
                "h2d_waits": h2d.waits if h2d else 0, "d2h_waits": self.d2h_pool.waits,
                "staging_bytes": (h2d.nbytes if h2d else 0) + self.d2h_pool.nbytes,
                "host_queue": self.worker.pending()}
