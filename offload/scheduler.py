"""TransferScheduler: rows down, row gradients back, CPU updates, all asynchronous and metered.

Owns docs/design.md "One training step". For each adapter layer (one SparseAdamW over one RowStore):

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

No lockstep (`device_flags=True`, the default): a staged fetch's rows are awaited by the device, on a
per-layer flag the worker's copy queue writes behind the rows (`offload.flags`), so the caller's thread
never waits for the worker's gather in a forward; engines without flags (or `device_flags=False`, the
plain twin) wait for the gather on the caller's thread. The meter counts the caller's waits on the worker
(`overlap.worker_waits`).

Zero-copy (`zero_copy=True`, MeftConfig.fetch_mode="zero_copy"): the device reads the rows from a pinned,
device-mapped mirror of each store instead (`offload.zero_copy.ZeroCopyFetch`); no H2D staging pool.

Data parallel (`process_group`, torch.distributed, staleness 0): each rank fetches and pushes its own rows;
at finish_step every layer's pending gradients are averaged across ranks over the union of their rows
(`offload.collective.RowGradReducer`) and every rank applies the same update: identical replicas. Stores
shared by the ranks of a node (`RowStore(..., node=...)`, one host copy per node): each rank of the node
updates the rows it owns, then a node barrier (`updates.UpdatePolicy`); zero-copy mirrors are shared too.

Gradient accumulation (accum_steps > 1): each layer's rows and gradients cross once per step, for the
union of its micro-batches' rows (`offload.union`).

Sparse update (`update_mask=True`, MeftConfig.sparse_update > 0): `push_grads(..., keep=)` carries a
fixed-shape per-row mask [K] bool on the device with the gradients. Masked rows' gradients are zeroed on
the device; the mask crosses D2H beside them (into the staging slot's `keep`), and the host update skips
those rows whole (`SparseAdamW.step_rows(keep=)` / `accumulate(keep=)`): no pending gradient, no moment
or step-count change. Under accumulation the step union ORs the micro-batches' masks on the device
(a row is updated when any micro-batch kept it, with the sum of the gradients of those that did).

Composed of: one `context.SchedulerContext` shared by the parts (engine, host worker, meter, pools,
error check), `fetch.LayerState` / `fetch.FetchHandle` (live rows and handles, linked back through a
`FetchLink`), `staged.StagedFetch` or `zero_copy.ZeroCopyFetch` (rows down), `union.UnionTraffic` (rows
and gradients under accumulation) and `updates.UpdateRunner` (staleness, clipping, parked updates).
Implements `protocol.RowScheduler`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from offload.collective import RowGradReducer
from offload.context import SchedulerContext
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
)
from offload.meter import TrafficMeter
from offload.node import shared_node
from offload.protocol import check_scheduler_args
from offload.push import GradPush
from offload.staged import StagedFetch
from offload.staging import SlotPool, check_n_slots, staging_bytes
from offload.steps import StepClock, check_layer
from offload.union import StepUnion, UnionTraffic
from offload.updates import UpdateRunner, check_update_args
from offload.worker import HostWorker, numba_threads_setter, thread_plan, wait_for
from offload.zero_copy import ZeroCopyFetch

__all__ = ["TransferScheduler", "FetchHandle"]


class TransferScheduler:
    """See the module docstring; implements `offload.protocol.RowScheduler`."""
    def __init__(self, optimizers: Sequence, *, device="cpu", engine: CopyEngine | None = None,
                 wire_dtype=torch.bfloat16, max_rows: int, n_slots: int = 2, staleness: int = 0,
                 clip: str = "none", max_norm: float = 1.0, meter: TrafficMeter | None = None,
                 host_threads: int | None = None, max_live_rows: int | None = None, timing: bool = False,
                 zero_copy: bool = False, process_group=None, update_mask: bool = False, device_flags: bool = True):
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
        if device_flags not in (True, False):
            raise ValueError(f"device_flags={device_flags!r} must be True or False")
        self.update_mask = update_mask  # push_grads may carry a sparse update's row mask (`keep`)
        # host_threads: the worker's kernels run on this many threads, main thread + team <= cores by default
        self.thread_plan = thread_plan(host_threads, engine="thread" if torch.device(device).type == "cpu"
                                       else "cuda", device=torch.device(device).type)
        init = numba_threads_setter(self.thread_plan["host_threads"])
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
        # rows down: staging slots, or (zero-copy) each store's mirror; gradients back: staging slots
        self.h2d_pool = None if zero_copy else SlotPool(self.engine, n_slots, max_rows, self.width, wire_dtype)
        self.d2h_pool = SlotPool(self.engine, n_slots, max_rows, self.width, wire_dtype, keep=update_mask)
        # staged fetches: the device waits for the worker's copies on a flag (no lockstep), where the engine can
        self.flags = self.engine.alloc_flags(len(self.layers)) if device_flags and not zero_copy else None
        self.worker = HostWorker(init=init, on_error=None if self.flags is None else self.flags.release_all)
        self.ctx = ctx = SchedulerContext(self.optimizers, self.engine, self.worker, self.meter, self.device,
                                          wire_dtype, max_rows, self.d2h_pool, self.h2d_pool, flags=self.flags)
        self._test_skip_waits = ctx.skip_waits  # test hook: add "h2d" / "d2h" / ... to disable that wait
        state_bytes = torch.empty((), dtype=self.optimizers[0].store.state_dtype).element_size()
        self.updates = UpdateRunner(ctx, staleness=staleness, clip=clip, max_norm=max_norm,
                                    state_bytes=state_bytes, reducer=reducer, node=node)
        self._link = FetchLink(ctx.check, self.updates.end_chain, self.meter.record_blocked, ctx.skip_waits,
                               flags=self.flags, wait_issued=self._wait_issued)
        self.clock = StepClock()
        self.union_traffic = UnionTraffic(ctx, self.updates)
        if zero_copy:
            self._fetcher = ZeroCopyFetch(ctx, self._link, self.union_traffic, self.updates)
            self._mirrors_dev = self._fetcher.mirrors_dev  # [N, W] wire per layer, as the device sees it
        else:
            self._fetcher = StagedFetch(ctx, self._link, self.union_traffic)
            self._mirrors_dev = []
        self._push = GradPush(ctx, self.updates)  # gradients back without accumulation
        self._read_buf: torch.Tensor | None = None  # [>= R, width] fp32 host buffer of read_rows
        self._closed = False

    staging_bytes = staticmethod(staging_bytes)  # host bytes the pools and layer buffers pin (offload.staging)

    # ------------------------------------------------------------------------------ errors
    def _check(self) -> None:
        """Raise a worker's exception in the caller (once, original object and traceback)."""
        self.ctx.check()

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
        return self._fetcher.start_part(st, ids, n, base, (self.step, self.micro_batch),
                                        accumulating=self._accumulating, cache_rows=self._cache_rows)

    def _wait_issued(self) -> None:
        """Wait until the worker has issued the copies of every staged part submitted so far (FIFO: each
        layer's newest part is enough); see `LayerState.stage_ids`."""
        for st in self.layers:
            if st.last_gather is not None and st.last_gather.staged:
                wait_for(st.last_gather.gathered, self._check)

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
        self._push.send(st, h, ids, grads, full, k, t0, step=self.step, micro_batch=self.micro_batch,
                        last=self.clock.last_micro_batch, keep=keep)

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
            if self.flags is not None:
                self.flags.release_all()  # a device wait for a part the worker never ran must not hang close
            if self._own_engine:
                self.engine.close()
        if not self.ctx.error_reported:
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
