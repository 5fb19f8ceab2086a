"""Update policy of the schedulers: when a layer's row update runs, how it is clipped, what is parked.

Owns the rules both schedulers share -- `clip_scale` (the clip factor, defined once), `CLIP_MODES` and
`check_update_args` -- and `UpdateRunner`, the object `TransferScheduler` owns for its host-side
updates: deciding that a layer's gradients of the step are complete (`grads_complete`), fixing the
update's hyper-parameters on the caller's thread, the update itself on the host worker (clip scale,
fused SparseAdamW step, metering), global-norm clipping, staleness 1 (a computed update waits for the
layer's next fetch: `take_pending` / `park`), and the step boundary (`end_step`, `settle`, `flush`). It
also counts, per layer, the updates queued and applied, so a zero-copy fetch can wait until its layer's
mirror holds every queued update (`wait_applied`). Data parallel (`reducer`, an
`offload.collective.RowGradReducer`): every layer's update waits for finish_step, where one worker task
combines each layer's gradients across ranks, in layer order on every rank, then updates. Stores shared
by the ranks of a node (`node`, an `offload.node.NodeGroup`): every rank holds the same combined gradients
and updates only the rows it owns (id % local_world == local_rank), then the node's ranks meet at a
barrier before anyone reads a row again.

It talks to its scheduler only through the shared `offload.context.SchedulerContext` (optimizers, host
worker, meter, `check`). Ending a layer's live fetch (`end_chain`) queues the update the fetch held back.
Per-layer update state lives in `LayerUpdate`.
"""

from __future__ import annotations

import math
import threading
import time

from offload.worker import POLL_S

__all__ = ["CLIP_MODES", "LayerUpdate", "UpdateRunner", "check_update_args", "clip_scale"]

CLIP_MODES = ("none", "layer", "global")


def clip_scale(sq_norm: float, max_norm: float) -> float:
    """Gradient scale for clipping to `max_norm` given the squared norm: min(1, max_norm / (||g|| + 1e-6)),
    torch.nn.utils.clip_grad_norm_'s factor."""
    return min(1.0, max_norm / (math.sqrt(sq_norm) + 1e-6))


def check_update_args(staleness, clip, max_norm, data_parallel: bool = False) -> None:
    if staleness not in (0, 1):
        raise ValueError(f"staleness={staleness!r} must be 0 (exact) or 1 (delayed update)")
    if data_parallel and staleness != 0:
        raise ValueError("staleness=1 with a process group (data parallel) is not supported yet: the delayed "
                         "update would be combined across ranks at different points; use staleness=0")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip={clip!r} must be one of {CLIP_MODES}")
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r} must be a number > 0")


class LayerUpdate:
    """Update bookkeeping of one layer."""

    __slots__ = ("index", "grads_step", "triggered_step", "pending_update", "update_hparams", "global_scale")

    def __init__(self, index: int):
        self.index = index
        self.grads_step = -1  # last step in which gradients were pushed
        self.triggered_step = -1  # step whose update has been triggered (last micro-batch / finish)
        self.pending_update = False  # staleness 1: a computed-but-unapplied update waits for a fetch
        self.update_hparams = None  # SparseAdamW.hparams() fixed when the layer's update was decided
        self.global_scale = 1.0  # clip="global": scale of the pending update (written by the worker)


class UpdateRunner:
    """Queues and runs a TransferScheduler's row updates: staleness, clipping, parked updates (see module
    docstring)."""

    def __init__(self, ctx, *, staleness: int, clip: str, max_norm: float, state_bytes: int, reducer=None,
                 node=None):
        check_update_args(staleness, clip, max_norm, data_parallel=reducer is not None)
        if node is not None and reducer is None:
            raise ValueError("UpdateRunner: stores shared by a node's ranks need a reducer (data parallel): each "
                             "rank updates its own share of the rows from the all-reduced gradients")
        self.reducer = reducer
        self.node = node  # offload.node.NodeGroup of shared stores: rows split by ownership, then a node barrier
        self.skip_waits = ctx.skip_waits  # test hook: "node" skips the node barrier
        self.test_update_delay_s = 0.0  # test hook: this rank sleeps so long before its row updates (a slow owner)
        self.optimizers, self.worker, self.meter, self.check = ctx.optimizers, ctx.worker, ctx.meter, ctx.check
        self.staleness, self.clip, self.max_norm = staleness, clip, float(max_norm)
        self.width, self.state_bytes = ctx.width, state_bytes
        optimizers = self.optimizers
        self.layers = [LayerUpdate(i) for i in range(len(optimizers))]
        self._applied = threading.Condition()  # guards the two counts below
        self._n_queued = [0] * len(optimizers)  # updates handed to the worker (run or parked), per layer
        self._n_applied = [0] * len(optimizers)  # updates the worker has finished, per layer

    # ---- applied-update counts (zero-copy fetches wait on them) -----------------------------------
    def _queued(self, layer: int) -> None:
        with self._applied:
            self._n_queued[layer] += 1

    def _done(self, layer: int) -> None:
        with self._applied:
            self._n_applied[layer] += 1
            self._applied.notify_all()

    def wait_applied(self, layer: int) -> None:
        """Block until every update queued for `layer` has been applied (a parked one is run now)."""
        with self._applied:
            if self._n_applied[layer] >= self._n_queued[layer]:
                return
        self.worker.submit(lambda: None, layer)  # a parked task of the layer runs before the layer's next task
        while True:
            with self._applied:
                if self._n_applied[layer] >= self._n_queued[layer]:
                    return
                self._applied.wait(POLL_S)
            self.check()

    # ---- per layer, on the caller's thread ------------------------------------------------------
    def triggered(self, layer: int, step: int) -> bool:
        """The layer's last-micro-batch gradients of `step` have arrived (its update is decided)."""
        return self.layers[layer].triggered_step == step

    def grads_pushed(self, layer: int, step: int) -> None:
        self.layers[layer].grads_step = step

    def grads_complete(self, layer: int, step: int) -> None:
        """The layer's last micro-batch pushed: update now (staleness 0) or later (1); clip "global"
        waits for finish_step instead."""
        if self.clip != "global" and self.reducer is None:  # data parallel: all layers at end_step
            self._trigger(self.layers[layer], step)

    def fuses(self) -> bool:
        """The update is due at once and scaled by nothing computed elsewhere: a layer whose gradients of the
        step cross in one push (one micro-batch per step, or the step union's single send under
        accumulation) is then updated in one pass straight from the staging slot (`fused_update`,
        SparseAdamW.step_rows) instead of accumulate + step (two passes over the gradients)."""
        return self.staleness == 0 and self.clip == "none" and self.reducer is None

    def fuse(self, layer: int, step: int) -> tuple:
        """The caller will run `fused_update` for this layer's single push of `step`: it is triggered now
        (finish_step will not update it again); returns the hyper-parameters, fixed on this thread."""
        u = self.layers[layer]
        u.grads_step = u.triggered_step = step
        u.update_hparams = hp = self.optimizers[layer].hparams()
        self._queued(layer)
        return hp

    def fused_update(self, layer: int, step: int, hparams: tuple, ids, grads, *, final: bool = True,
                     keep=None) -> None:
        """On the host worker: the row update of a fused layer from its gradients [R, W] (wire). A step
        union crosses in chunks of distinct rows: each chunk is updated as it lands (rows are independent),
        and `final` marks the last one (the layer's update counts as applied then). `keep` [R] bool (host):
        a sparse update's row mask; only the kept rows are updated and metered."""
        opt, t0 = self.optimizers[layer], time.perf_counter()
        rows = ids.shape[0] if keep is None else int(keep.sum())  # rows updated: what the meter reports
        try:
            # without a mask, the call as it was (an optimizer need not know about masks)
            opt.step_rows(ids, grads, hparams=hparams, **({} if keep is None else {"keep": keep}))
        finally:
            if final:
                self._done(layer)
        # bytes touched: weights fp32 + both moments, read and written, plus the wire-dtype grads once
        nbytes = rows * self.width * (2 * (4 + 2 * self.state_bytes) + grads.element_size())
        self.meter.record_update(step=step, layer=layer, rows=rows, nbytes=nbytes, start=t0, end=time.perf_counter())

    def end_chain(self, st) -> None:
        """End layer state `st`'s live fetch (all parts); queue the staleness-1 update it held back, if any."""
        root = st.end_chain()
        if root is not None:
            self.park(st.index, *root.take_owed())

    def take_pending(self, layer: int, step: int) -> tuple[int, tuple] | None:
        """Staleness 1: the layer's computed update, which must follow the gather of the fetch now being
        issued; returns (step, hparams) to hand to `park` then, or None."""
        u = self.layers[layer]
        if not u.pending_update:
            return None
        u.pending_update = False
        return step, u.update_hparams

    def park(self, layer: int, step: int, hparams: tuple) -> None:
        """Queue an owed staleness-1 update: parked until idle time or the layer's next task."""
        self._queued(layer)
        self.worker.defer(layer, lambda: self._update_task(self.layers[layer], step, hparams))

    def _trigger(self, u: LayerUpdate, step: int) -> None:
        u.triggered_step = step
        # The update's lr etc. are fixed now, on the caller's thread: the caller may change them (an lr
        # schedule) before the worker runs the update, and the result must not depend on that timing.
        u.update_hparams = hp = self.optimizers[u.index].hparams()
        if self.staleness == 0:
            self._queued(u.index)
            self.worker.submit(lambda: self._update_task(u, step, hp), u.index)
        else:
            u.pending_update = True

    # ---- on the host worker ---------------------------------------------------------------------
    def _update_task(self, u: LayerUpdate, step: int, hparams: tuple) -> None:
        opt = self.optimizers[u.index]
        t0 = time.perf_counter()
        if self.clip == "layer":
            scale = clip_scale(opt.grad_sq_norm(), self.max_norm)
        elif self.clip == "global":
            scale = u.global_scale
        else:
            scale = 1.0
        owner = None if self.node is None else self.node.owner
        rows = opt.pending_rows if owner is None else int(opt.owned(owner).sum())  # the rows this rank writes
        try:
            if owner is None:
                opt.step(grad_scale=scale, hparams=hparams)
            else:  # a node's shared store: this rank's share of the rows
                opt.step(grad_scale=scale, hparams=hparams, owner=owner)
        finally:
            self._done(u.index)
        # bytes touched: weights fp32 + both moments, read and written, plus the fp32 pending grads
        nbytes = rows * self.width * (2 * (4 + 2 * self.state_bytes) + 4)
        self.meter.record_update(step=step, layer=u.index, rows=rows, nbytes=nbytes, start=t0,
                                 end=time.perf_counter())

    def _global_task(self, layers: list[LayerUpdate], step: int) -> None:
        sq = 0.0
        for u in layers:  # layer order, float64 on the host: deterministic
            sq += self.optimizers[u.index].grad_sq_norm()
        scale = clip_scale(sq, self.max_norm)
        for u in layers:
            u.global_scale = scale
            if self.staleness == 0:
                self._update_task(u, step, u.update_hparams)

    # ---- step boundary --------------------------------------------------------------------------
    def end_step(self, step: int) -> None:
        """Trigger the updates of step `step` not triggered yet (clip "global": all, after the norm)."""
        if self.reducer is not None:
            self._end_step_across_ranks(step)
            return
        with_grads = [u for u in self.layers if u.grads_step == step]
        if self.clip == "global":
            for u in with_grads:
                u.triggered_step = step
                u.update_hparams = self.optimizers[u.index].hparams()  # fixed on this thread (see _trigger)
                u.pending_update = self.staleness == 1
                if self.staleness == 0:
                    self._queued(u.index)  # updated by the global task below
            self.worker.submit(lambda: self._global_task(with_grads, step))
        else:
            for u in with_grads:
                if u.triggered_step != step:
                    self._trigger(u, step)

    def _end_step_across_ranks(self, step: int) -> None:
        """Data parallel: every layer (another rank may hold gradients for one this rank did not touch) is
        combined across ranks in layer order by one worker task, which then updates them (clip "global": by
        the norm of the combined gradients)."""
        layers = self.layers
        for u in layers:
            u.triggered_step = step
            u.update_hparams = self.optimizers[u.index].hparams()  # fixed on this thread (see _trigger)
            self._queued(u.index)

        def task() -> None:
            for u in layers:  # the same collectives in the same order on every rank
                self.reducer.reduce(self.optimizers[u.index], u.index, step)
            if self.clip == "global":
                scale = clip_scale(sum(self.optimizers[u.index].grad_sq_norm() for u in layers), self.max_norm)
                for u in layers:
                    u.global_scale = scale
            if self.test_update_delay_s:
                time.sleep(self.test_update_delay_s)
            for u in layers:
                self._update_task(u, step, u.update_hparams)
            if self.node is not None and "node" not in self.skip_waits:
                # protects the shared rows: every rank of the node has written its share of the update before
                # any of them reads a row again (the next fetch's gather, read_rows, a checkpoint); settle()
                # holds finish_step until this task, barrier included, is done
                self.node.barrier()
        self.worker.submit(task)

    def settle(self) -> None:
        """After end_step: staleness 0 waits until every update of the step is done."""
        if self.staleness == 0:
            self.worker.barrier(self.check)  # protects the caller: the step's updates have landed
        self.check()

    def submit_pending(self, layer: int, step: int) -> None:
        """flush: queue the layer's computed-but-unapplied (staleness 1) update now."""
        u = self.layers[layer]
        if u.pending_update:
            u.pending_update = False
            hp = u.update_hparams
            self._queued(layer)
            self.worker.submit(lambda: self._update_task(u, step, hp), layer)

    def drain(self) -> None:
        """flush: run every parked update and wait for all host work to finish."""
        self.worker.run_deferred()
        self.worker.barrier(self.check)  # protects the caller: every row update has landed
        self.check()
