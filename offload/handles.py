"""FetchHandle (what `TransferScheduler.fetch` returns) and the per-layer buffers and state.

Per layer, allocated once: `rows_dev` [C, width] wire dtype on the compute device (the H2D target),
`ids_host` [C] int64 on the host (staging for the gather; pinned on CUDA), `ids_dev` [C] int64 on the
device (only when the device is not the CPU), and `grads_dev` [max_rows, width] wire dtype on the
device, created on first use, for gradients that arrive in another dtype (cast there before the D2H).
C is the layer's live capacity, `max_live_rows` (default max_rows): the rows one live fetch may hold
including `fetch_more` extensions (a lookahead prefetch plus its misses needs up to 2 * max_rows).

A live fetch is a chain of parts: the first `fetch` fills rows [0, n0) of the buffers, each `fetch_more`
appends its rows after the previous part. The handle of the newest part stands for the whole chain
(its `wait()` returns rows [0, n) after every part has landed); the older handles stay valid for their
own rows until the chain ends (push_grads, release, the layer's next fetch, finish_step).
"""

from __future__ import annotations

import threading

import torch

from offload.sched_args import check_subset
from offload.slots import wait_for

__all__ = ["FetchHandle", "LayerState"]


class LayerState:
    """Buffers and bookkeeping of one adapter layer (see module docstring)."""

    def __init__(self, index: int, engine, max_rows: int, width: int, wire_dtype: torch.dtype, on_host: bool):
        self.index = index
        self.alloc(engine, max_rows, width, wire_dtype, on_host)
        self.grads_dev: torch.Tensor | None = None  # [max_rows, W] wire, lazily
        self.handle: FetchHandle | None = None  # the live fetch of this layer
        self.last_gather: FetchHandle | None = None  # the latest fetch (its gather may still run)
        self.last_d2h = None  # CopyEvent of the latest D2H out of grads_dev
        self.grads_step = -1  # last step in which push_grads was called
        self.triggered_step = -1  # step whose update has been triggered (last micro-batch / finish)
        self.pending_update = False  # staleness 1: a computed-but-unapplied update waits for a fetch
        self.update_hparams = None  # SparseAdamW.hparams() fixed when the layer's update was decided
        self.global_scale = 1.0  # clip="global": scale of the pending update (written by the worker)
        self.ids_reader: threading.Event | None = None  # set once the worker's subset check read ids_host

    def alloc(self, engine, capacity: int, width: int, wire_dtype: torch.dtype, on_host: bool) -> None:
        """(Re)allocate the live buffers for `capacity` rows (no fetch may be live)."""
        self.capacity = capacity
        self.rows_dev = engine.alloc_device((capacity, width), wire_dtype)  # [C, W] wire
        self.ids_host = engine.alloc_host((capacity,), torch.int64)  # [C]
        self.ids_dev = self.ids_host if on_host else engine.alloc_device((capacity,), torch.int64)  # [C]

    def stage_ids(self, sched, ids, n: int, base: FetchHandle | None, marker) -> FetchHandle:
        """Put a fetch part's `ids` [n] in place (after `base`'s rows, if any) and make its handle:
        host ids -> ids_host (+ H2D into ids_dev); device ids -> D2H into ids_host (metered as "ids")."""
        off = 0 if base is None else base.n_rows
        end = off + n
        if ids.device.type == "cpu":
            self.ids_host[off:end].copy_(ids)
            h = FetchHandle(sched, self, sched.step, sched.micro_batch, end, self.ids_dev[off:end], base)
            if self.ids_dev is not self.ids_host:
                h.ids_event = sched.engine.h2d(self.ids_host[off:end], self.ids_dev[off:end], rows=n, after=marker)
            return h
        h = FetchHandle(sched, self, sched.step, sched.micro_batch, end, ids, base)
        meta = (sched.step, sched.micro_batch, self.index)
        h.ids_event = sched.engine.d2h(ids, self.ids_host[off:end], rows=n, after=marker,
                                       on_done=lambda ev: sched._meter_copy(ev, "ids", meta))
        return h

    def push_is_full(self, h: FetchHandle, ids) -> bool:
        """push_grads: True if `ids` are live fetch `h`'s own ids (then copied from ids_host). Otherwise
        a partial push: host ids are checked here (unique, all live), device ids later by the worker.
        Device ids as many as a plain fetch's are taken as its ids (comparing would wait for compute)."""
        n = h.n_rows
        if ids.numel() == n and h.base is None:
            if ids.device.type != "cpu" or ids.data_ptr() == self.ids_host.data_ptr():
                return True
            h.wait_gathered()
            if torch.equal(ids, self.ids_host[:n]):
                return True
        if ids.device.type == "cpu":
            h.wait_gathered()  # ids_host holds every part's ids
            check_subset(ids, self.ids_host[:n], self.index)
        return False

    def end_chain(self) -> FetchHandle | None:
        """End the live fetch (every part); return its first part if it holds back a staleness-1 update."""
        h, self.handle = self.handle, None
        parts = h.parts()
        for p in parts:
            p.valid = False
        return parts[0] if parts[0].owes_update is not None else None


class FetchHandle:
    """Rows of one fetch. `wait()` -> rows on the device [R, width] wire dtype.

    Valid until the layer's `push_grads`, `release()`, or the layer's next fetch.
    """

    def __init__(self, sched, layer: LayerState, step: int, micro_batch: int, n_rows: int, ids_dev,
                 base: FetchHandle | None = None):
        self._sched, self._layer = sched, layer
        self.layer, self.step, self.micro_batch, self.n_rows = layer.index, step, micro_batch, n_rows
        self._ids_dev = ids_dev  # [R] int64 on the device (this part's ids for a fetch_more part)
        self.base = base  # the previous part of the chain (fetch_more), or None
        self.offset = 0 if base is None else base.n_rows  # this part's rows are [offset, n_rows)
        self.extendable = False  # fetch(..., extendable=True): a staleness-1 update waits for the chain's end
        self.owes_update = None  # (step, hparams) of that update while it waits
        self.emitted_update = False  # the update this fetch held is queued (fetch_more would read after it)
        self.gathered = threading.Event()  # set by the host worker once rows are in the slot
        self.copy_event = None  # the H2D CopyEvent, set by the host worker
        self.ids_event = None  # the ids copy (device <-> host), set in fetch
        self.valid = True

    def _live(self, what: str) -> None:
        if not self.valid:
            raise ValueError(f"FetchHandle(layer={self.layer}, step={self.step}, micro_batch="
                             f"{self.micro_batch}).{what}: the handle is no longer valid (push_grads, "
                             "release() or a newer fetch of this layer ended it); keep the rows you need "
                             "or fetch again")

    def parts(self) -> list[FetchHandle]:
        """The chain, oldest part first."""
        out, h = [], self
        while h is not None:
            out.append(h)
            h = h.base
        return out[::-1]

    def wait_gathered(self) -> None:
        """Every part's rows are in their staging slots (and their ids in ids_host)."""
        for h in self.parts():
            wait_for(h.gathered, self._sched._check)

    def wait(self) -> torch.Tensor:
        """Rows on the compute device, [R, width] wire dtype (a view of the layer's buffer)."""
        self._sched._check()
        self._live("wait()")
        if "h2d" not in self._sched._test_skip_waits:
            self.wait_gathered()
            for h in self.parts():
                # protects compute from reading rows_dev before the H2D of these rows has landed
                # (CUDA: the compute stream waits; thread engine: the host waits)
                h.copy_event.wait_device()
        self._sched._check()
        return self._layer.rows_dev[: self.n_rows]

    @property
    def ids_host(self) -> torch.Tensor:
        """[R] int64 on the host (waits until the ids have arrived there)."""
        self._live("ids_host")
        if any(h.ids_event is not None and h.ids_event.direction == "d2h" for h in self.parts()):
            self.wait_gathered()  # the gather ran after the ids D2H completed
        return self._layer.ids_host[: self.n_rows]

    @property
    def ids_dev(self) -> torch.Tensor:
        """[R] int64 on the compute device."""
        self._live("ids_dev")
        if self.base is None:
            return self._own_ids_dev()
        return torch.cat([h._own_ids_dev() for h in self.parts()])  # [n] a new tensor (chains only)

    def _own_ids_dev(self) -> torch.Tensor:
        if self.ids_event is not None and self.ids_event.direction == "h2d":
            # protects compute from reading ids_dev before its H2D has landed
            self.ids_event.wait_device()
        return self._ids_dev

    def release(self) -> None:
        """End this fetch without gradients (e.g. evaluation); the layer may be fetched again.
        On the chain's newest handle it ends the whole chain."""
        if not self.valid:
            return
        if self._layer.handle is self:
            self._sched._end_chain(self._layer)
        else:
            self.valid = False

    def __repr__(self) -> str:
        return (f"FetchHandle(layer={self.layer}, step={self.step}, micro_batch={self.micro_batch}, "
                f"rows={self.n_rows}, valid={self.valid})")
