"""Per-layer live rows and fetch handles of `TransferScheduler`, and the checks of fetch / push arguments.

Per layer (`LayerState`), allocated once: `rows_dev` [C, width] wire dtype on the compute device (the
H2D target), `ids_host` [C] int64 on the host (staging for the gather; pinned on CUDA), `ids_dev` [C]
int64 on the device (only when the device is not the CPU), and `grads_dev` [max_rows, width] wire dtype
on the device, created on first use, for gradients that arrive in another dtype (cast there before the
D2H). C is the layer's live capacity, `max_live_rows` (default max_rows): the rows one live fetch may
hold including `fetch_more` extensions (a lookahead prefetch plus its misses needs up to 2 * max_rows).
With gradient accumulation each layer also has `slots_host` / `slots_dev` [C] int64 (the live rows' slots
in the step union, `offload.union.StepUnion`, staged like the ids) and the union itself (`union`).

A live fetch is a chain of parts: the first `fetch` fills rows [0, n0) of the buffers, each `fetch_more`
appends its rows after the previous part. The handle of the newest part stands for the whole chain
(its `wait()` returns rows [0, n) after every part has landed); the older handles stay valid for their
own rows until the chain ends (push_grads, release, the layer's next fetch, finish_step).

Handles talk to their scheduler only through a `FetchLink` (raise a worker error, end a layer's chain,
the test hook that disables waits). The argument checks (`check_ids`, `check_grads`, `check_subset`,
`check_extend`, `check_live_rows`) are shared with `offload.resident.ResidentScheduler`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from offload.worker import wait_for

__all__ = ["FetchHandle", "FetchLink", "LayerState", "valid_prefix", "check_extend", "check_grads", "check_ids",
           "check_keep", "check_live_rows", "check_subset"]


# ---------------------------------------------------------------------------------- argument checks
def check_live_rows(max_live_rows, max_rows: int) -> int:
    """`max_live_rows` (rows one layer's live fetch may hold, fetch_more included): None -> max_rows."""
    if max_live_rows is None:
        return max_rows
    if not isinstance(max_live_rows, int) or isinstance(max_live_rows, bool) or max_live_rows < max_rows:
        raise ValueError(f"max_live_rows={max_live_rows!r} must be an int >= max_rows={max_rows} (rows one "
                         f"layer's live fetch holds; a lookahead prefetch plus its misses needs 2 * max_rows "
                         f"= {2 * max_rows}) or None")
    return max_live_rows


def valid_prefix(ids_host: torch.Tensor) -> int:
    """How many of a fetch part's host ids [n] come before its -1 padding (fixed-shape routing puts the
    used slots first). Host-side numpy: the host worker calls it once the ids have landed."""
    a = ids_host.numpy()
    return int(a.shape[0]) if a.shape[0] == 0 or a[-1] >= 0 else int(np.count_nonzero(a >= 0))


def check_ids(ids, what: str, max_rows: int, device: torch.device) -> int:
    """Validate row ids of a fetch / push: 1-D int64, at most `max_rows`, on the CPU or `device`."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{what}: ids must be a 1-D int64 tensor [R], got {got}")
    if ids.numel() > max_rows:
        raise ValueError(f"{what}: {ids.numel()} ids exceed max_rows={max_rows}; raise max_rows or "
                         "lower the router's row budget")
    if ids.device.type not in ("cpu", device.type):
        raise ValueError(f"{what}: ids are on {ids.device}; pass them on the CPU or on {device}")
    return ids.numel()


def check_grads(grads, k: int, width: int, layer: int, device: torch.device) -> None:
    """push_grads: grads must be a float tensor [k, width] on the compute device."""
    if not isinstance(grads, torch.Tensor) or not grads.is_floating_point():
        got = grads.dtype if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise TypeError(f"push_grads: grads must be a floating-point tensor [R, {width}], got {got}")
    if tuple(grads.shape) != (k, width):
        raise ValueError(f"push_grads: grads has shape {tuple(grads.shape)}, expected ({k}, {width}) = "
                         f"(ids pushed for layer {layer}, width)")
    if grads.device.type != device.type:
        raise ValueError(f"push_grads: grads are on {grads.device}, expected {device}")


def check_keep(keep, k: int, enabled: bool, device: torch.device) -> torch.Tensor:
    """push_grads(keep=): a sparse update's row mask must be a bool tensor [k], on the CPU or the gradients'
    device, and the scheduler must have been built for it (`update_mask=True`). -> keep on `device`."""
    if not enabled:
        raise ValueError("push_grads: keep= (a sparse update's row mask) needs a scheduler built with "
                         "update_mask=True")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (k,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise TypeError(f"push_grads: keep must be a bool tensor [{k}] (one flag per pushed row), got {got}")
    if keep.device.type not in ("cpu", device.type):
        raise ValueError(f"push_grads: keep is on {keep.device}; pass it on the CPU or on {device}")
    return keep.to(device)


def check_subset(ids_host: torch.Tensor, live_host: torch.Tensor, layer: int) -> None:
    """A partial push: `ids_host` [K] must be unique and all among the live fetch's ids `live_host` [n]."""
    inside = torch.isin(ids_host, live_host)  # [K] bool
    if not bool(inside.all()):
        bad = ids_host[~inside]
        raise ValueError(f"push_grads: ids differ from the ids fetched for layer {layer}: {bad.numel()} of "
                         f"{ids_host.numel()} (e.g. {bad[:4].tolist()}) are not among the {live_host.numel()} "
                         "rows of its live fetch; push the fetched ids or a subset of them (fetch_more adds "
                         "rows to a live fetch)")
    if torch.unique(ids_host).numel() != ids_host.numel():
        raise ValueError(f"push_grads: ids for layer {layer} repeat a row; pass each row once")


def check_extend(base, m: int, layer: int, step: int, micro_batch: int, capacity: int, max_rows: int) -> None:
    """fetch_more(layer, ids [m]) onto live fetch `base` (None, or an object with `step`, `micro_batch`,
    `n_rows` and `update_followed`: the layer's newest handle)."""
    if base is None or base.step != step or base.micro_batch != micro_batch:
        raise ValueError(f"fetch_more: layer {layer} has no live fetch in micro-batch {micro_batch} of step "
                         f"{step}; call fetch({layer}, ids) first")
    if m == 0:
        raise ValueError(f"fetch_more: ids is empty; nothing to add to layer {layer}'s fetch")
    if base.n_rows + m > capacity:
        raise ValueError(f"fetch_more: layer {layer}'s live fetch would hold {base.n_rows} + {m} rows, more "
                         f"than max_live_rows={capacity}; build the scheduler with max_live_rows={2 * max_rows} "
                         f"(2 * max_rows) or call reserve_live_rows({2 * max_rows})")
    if base.update_followed:
        raise ValueError(f"fetch_more: layer {layer}'s delayed (staleness 1) update already follows its fetch, "
                         "so added rows would be read after it; fetch with extendable=True")


# ---------------------------------------------------------------------------------- the scheduler link
class FetchLink:
    """What handles need from their scheduler, and nothing else."""

    __slots__ = ("check", "end_chain", "blocked", "skip_waits", "flags", "wait_issued")

    def __init__(self, check: Callable[[], None], end_chain: Callable[[LayerState], None],
                 blocked: Callable[..., None], skip_waits: set[str], flags=None,
                 wait_issued: Callable[[], None] | None = None):
        self.check = check  # raises a host-worker error in the caller
        self.end_chain = end_chain  # ends a layer's live fetch (queues the update it held back)
        self.blocked = blocked  # (step, start, end, on=): the caller's thread waited on rows (for the meter)
        self.skip_waits = skip_waits  # test hook (shared with the scheduler): {"h2d", ...} disables that wait
        self.flags = flags  # offload.flags.DeviceFlags of a staged fetch, or None (wait for the worker)
        self.wait_issued = wait_issued  # waits until the worker has issued every flagged copy submitted so far


class LayerState:
    """Buffers and live fetch of one adapter layer (see module docstring)."""

    def __init__(self, index: int, engine, max_rows: int, width: int, wire_dtype: torch.dtype, on_host: bool):
        self.index = index
        self.alloc(engine, max_rows, width, wire_dtype, on_host)
        self.union = None  # offload.union.StepUnion: the step's rows and summed gradients (set by the scheduler)
        self.last_slots_h2d = None  # CopyEvent of the latest H2D out of slots_host
        self.grads_dev: torch.Tensor | None = None  # [max_rows, W] wire, lazily
        self.handle: FetchHandle | None = None  # the live fetch of this layer
        self.last_gather: FetchHandle | None = None  # the latest fetch (its gather may still run)
        self.last_d2h = None  # CopyEvent of the latest D2H out of grads_dev
        self.ids_reader: threading.Event | None = None  # set once the worker's subset check read ids_host
        self.last_ids_h2d = None  # CopyEvent of the latest H2D out of ids_host (fetch with host ids)

    def alloc(self, engine, capacity: int, width: int, wire_dtype: torch.dtype, on_host: bool) -> None:
        """(Re)allocate the live buffers for `capacity` rows (no fetch may be live)."""
        self.capacity = capacity
        self.rows_dev = engine.alloc_device((capacity, width), wire_dtype)  # [C, W] wire
        self.ids_host = engine.alloc_host((capacity,), torch.int64)  # [C]
        self.ids_dev = self.ids_host if on_host else engine.alloc_device((capacity,), torch.int64)  # [C]
        self.slots_host = engine.alloc_host((capacity,), torch.int64)  # [C] slots in the step union
        self.slots_dev = self.slots_host if on_host else engine.alloc_device((capacity,), torch.int64)  # [C]

    def stage_ids(self, link: FetchLink, engine, ids, n: int, base: FetchHandle | None, marker,
                  key: tuple[int, int], on_ids_d2h: Callable) -> FetchHandle:
        """Put a fetch part's `ids` [n] in place (after `base`'s rows, if any) and make its handle for
        (step, micro-batch) `key`: host ids -> ids_host (+ H2D into ids_dev); device ids -> D2H into
        ids_host (`on_ids_d2h(ev)` when it is done: metered as "ids")."""
        off = 0 if base is None else base.n_rows
        end = off + n
        if ids.device.type == "cpu":
            if self.ids_dev is not self.ids_host and link.wait_issued is not None:
                # protects against a deadlock: this ids H2D goes on the copy stream from this thread and waits
                # for compute issued so far, which may include a flag wait for a copy the worker has not
                # issued yet (it would queue behind this one); host ids are not the training path
                link.wait_issued()
            if self.last_ids_h2d is not None:
                # protects ids_host: the previous host-ids H2D out of it is queued behind compute on the
                # copy stream and may not have read it yet; overwriting now would hand that fetch these ids
                self.last_ids_h2d.wait()
                self.last_ids_h2d = None
            self.ids_host[off:end].copy_(ids)
            h = FetchHandle(link, self, key, end, self.ids_dev[off:end], base)
            h.given_ids = ids  # push_grads recognises the caller's own tensor without comparing values
            if self.ids_dev is not self.ids_host:
                h.ids_event = self.last_ids_h2d = engine.h2d(self.ids_host[off:end], self.ids_dev[off:end], rows=n,
                                                             after=marker)
            return h
        h = FetchHandle(link, self, key, end, ids, base)
        h.ids_event = engine.d2h(ids, self.ids_host[off:end], rows=n, after=marker, on_done=on_ids_d2h)
        return h

    def push_is_full(self, h: FetchHandle, ids) -> bool:
        """push_grads: True if `ids` are live fetch `h`'s own ids (then copied from ids_host). Otherwise
        a partial push: host ids are checked here (unique, all live), device ids later by the worker.
        Device ids are the fetch's own only when they are the very tensor it holds (the tensor given to
        fetch, or handle.ids_dev): any other device tensor -- the same rows in another order, say -- is a
        partial push whose ids cross to the host (comparing values here would wait for compute)."""
        n = h.n_rows
        if ids.numel() == n and h.base is None:
            if ids is h.given_ids:
                return True
            if ids.device.type != "cpu":
                own = h._ids_dev  # [n] the fetch's ids on the device (identity only: no wait needed)
                return ids.data_ptr() == own.data_ptr() and ids.stride() == own.stride()
            if ids.data_ptr() == self.ids_host.data_ptr():
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

    def __init__(self, link: FetchLink, layer: LayerState, key: tuple[int, int], n_rows: int, ids_dev,
                 base: FetchHandle | None = None):
        self._link, self._layer = link, layer
        self.layer, self.n_rows = layer.index, n_rows
        self.step, self.micro_batch = key
        self._ids_dev = ids_dev  # [R] int64 on the device (this part's ids for a fetch_more part)
        self.base = base  # the previous part of the chain (fetch_more), or None
        self.offset = 0 if base is None else base.n_rows  # this part's rows are [offset, n_rows)
        self.owes_update = None  # (step, hparams) of a staleness-1 update held until the chain ends
        self.emitted_update = False  # the update this fetch held is queued (fetch_more would read after it)
        self.gathered = threading.Event()  # set by the host worker once rows are in the slot
        self.n_valid = 0  # this part's rows before any -1 padding, set by the host worker's gather
        self.given_ids = ids_dev  # the ids tensor the caller passed to fetch
        self.copy_event = None  # the H2D CopyEvent, set by the host worker
        self.ids_event = None  # the ids copy (device <-> host), set in fetch
        self.slots_event = None  # the H2D of this part's union slots (accumulation; None where host = device)
        self.in_union = False  # fetched in a step with accumulation: slots in the step union
        self.union_rows = None  # [U + 1, W] the step union's rows this part is taken from (row caching)
        self.staged = False  # the host worker issues this part's H2D (StagedFetch)
        self.flag_value = None  # staged with device flags: the layer's flag reaches it once this part landed
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

    def take_owed(self) -> tuple[int, tuple]:
        """The staleness-1 update this (first) part held back, now to be queued: (step, hparams)."""
        owed, self.owes_update, self.emitted_update = self.owes_update, None, True
        return owed

    @property
    def update_followed(self) -> bool:
        """The staleness-1 update held by the chain was already queued after its gather."""
        root = self.parts()[0]
        return root.owes_update is None and root.emitted_update

    def wait_gathered(self) -> None:
        """Every part's rows are in their staging slots (and their ids in ids_host)."""
        for h in self.parts():
            wait_for(h.gathered, self._link.check)

    def wait(self) -> torch.Tensor:
        """Rows on the compute device, [R, width] wire dtype (a view of the layer's buffer)."""
        self._link.check()
        self._live("wait()")
        if "h2d" not in self._link.skip_waits:
            t0 = time.perf_counter()
            if self.flag_value is not None:
                # protects compute from reading rows_dev (and, under accumulation, slots_dev) before the host
                # worker's copies of every part have landed: the compute stream waits until the layer's flag
                # reaches the newest part's value (values grow per layer and the flag is written behind the
                # copies, so it covers the older parts); this thread does not wait for the worker (CUDA: the
                # host returns at once; thread engine: the "device" is this thread)
                self._link.flags.wait_device(self.layer, self.flag_value, self._link.check)
                self._link.blocked(self.step, t0, time.perf_counter(), on="device")
            else:
                for h in self.parts():
                    if h.copy_event is None:  # staged without flags: the worker issues the H2D once it gathered
                        wait_for(h.gathered, self._link.check)
                    # protects compute from reading rows_dev before the H2D (zero-copy: the device's read from
                    # the mirror) of these rows has landed (CUDA: the compute stream waits; thread engine: host)
                    h.copy_event.wait_device()
                self._link.blocked(self.step, t0, time.perf_counter(), on="worker" if self.staged else "device")
        self._link.check()
        st = self._layer
        for h in self.parts():
            if h.union_rows is not None:  # rows cached in the step union: take this part's by slot, once
                torch.index_select(h.union_rows, 0, st.slots_dev[h.offset:h.n_rows], out=st.rows_dev[h.offset:h.n_rows])
                h.union_rows = None
        return st.rows_dev[: self.n_rows]

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
            self._link.end_chain(self._layer)
        else:
            self.valid = False

    def __repr__(self) -> str:
        return (f"FetchHandle(layer={self.layer}, step={self.step}, micro_batch={self.micro_batch}, "
                f"rows={self.n_rows}, valid={self.valid})")
