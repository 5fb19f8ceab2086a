"""The update phase of `offload.TransferScheduler`: when and how a layer's CPU row update runs.

Owns: deciding that a layer's gradients of the step are complete (`_trigger`), fixing the update's
hyper-parameters on the caller's thread, the update itself on the host worker (clip scale, fused
SparseAdamW step, metering), global-norm clipping, and the step boundary (`finish_step`, `flush`).
A mixin: it uses the scheduler's state (`optimizers`, `layers`, `worker`, `meter`, `step`, `clip`,
`max_norm`, `staleness`, `width`) and its `_entry` / `_check` / `_release_update` helpers.
"""

from __future__ import annotations

import time

from offload.handles import LayerState
from offload.sched_args import clip_scale

__all__ = ["UpdatePhase"]


class UpdatePhase:
    """Mixed into TransferScheduler; see the module docstring."""

    def _trigger(self, st: LayerState) -> None:
        """The layer's gradients of this step are complete: update now (staleness 0) or later (1)."""
        st.triggered_step = self.step
        # The update's lr etc. are fixed now, on the caller's thread: the caller may change them (an lr
        # schedule) before the worker runs the update, and the result must not depend on that timing.
        st.update_hparams = hp = self.optimizers[st.index].hparams()
        if self.staleness == 0:
            step = self.step
            self.worker.submit(lambda: self._update_task(st, step, hp), st.index)
        else:
            st.pending_update = True

    def _update_task(self, st: LayerState, step: int, hparams: tuple) -> None:
        opt = self.optimizers[st.index]
        t0 = time.perf_counter()
        if self.clip == "layer":
            scale = clip_scale(opt.grad_sq_norm(), self.max_norm)
        elif self.clip == "global":
            scale = st.global_scale
        else:
            scale = 1.0
        rows = opt.pending_rows
        opt.step(grad_scale=scale, hparams=hparams)
        # bytes touched: weights fp32 + both moments, read and written, plus the fp32 pending grads
        nbytes = rows * self.width * (2 * (4 + 2 * self._state_bytes) + 4)
        self.meter.record_update(step=step, layer=st.index, rows=rows, nbytes=nbytes, start=t0,
                                 end=time.perf_counter())

    def _global_task(self, layers: list[LayerState], step: int) -> None:
        sq = 0.0
        for st in layers:  # layer order, float64 on the host: deterministic
            sq += self.optimizers[st.index].grad_sq_norm()
        scale = clip_scale(sq, self.max_norm)
        for st in layers:
            st.global_scale = scale
            if self.staleness == 0:
                self._update_task(st, step, st.update_hparams)

    def finish_step(self) -> None:
        """End the step: trigger remaining updates; staleness 0 waits until all of them are done."""
        self._entry("finish_step")
        if not self._in_step:
            raise ValueError("finish_step: no step in progress; call begin_step() first")
        for st in self.layers:
            if st.handle is not None:
                st.handle.release()  # fetches without gradients; queues an update a prefetch held back
        with_grads = [st for st in self.layers if st.grads_step == self.step]
        if self.clip == "global":
            for st in with_grads:
                st.triggered_step = self.step
                st.update_hparams = self.optimizers[st.index].hparams()  # fixed on this thread (see _trigger)
                st.pending_update = self.staleness == 1
            step = self.step
            self.worker.submit(lambda: self._global_task(with_grads, step))
        else:
            for st in with_grads:
                if st.triggered_step != self.step:
                    self._trigger(st)
        self._in_step = False
        if self.staleness == 0:
            self.worker.barrier(self._check)
        self._check()

    def flush(self) -> None:
        """Apply every pending (staleness 1) update now and wait for all host work to finish."""
        self._entry("flush")
        for st in self.layers:
            root = None if st.handle is None else st.handle.parts()[0]
            if root is not None and root.owes_update is not None:
                self._release_update(st, root)  # a live prefetch's held-back update (no fetch_more after)
            if st.pending_update:
                st.pending_update = False
                step = self.step
                self.worker.submit(lambda st=st, step=step, hp=st.update_hparams: self._update_task(st, step, hp),
                                   st.index)
        self.worker.run_deferred()
        self.worker.barrier(self._check)
        self._check()
