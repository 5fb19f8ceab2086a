"""RowStore: CPU-resident master rows `[n_rows, width]` fp32 plus their AdamW state.

Owns the host memory of one adapter layer: fp32 master weights, AdamW first/second moments (fp32,
or bf16 to halve host RAM) and a per-row int64 step count (lazy AdamW bias correction). Host RAM is
checked with psutil *before* anything is allocated. Nothing here is pinned: no copy reads the fp32
master rows or the moments (the device receives rows through pinned staging slots of the copy engine),
and pinning them would only lock RAM (rounded up to a power of two by PyTorch's caching host
allocator). `gather` copies rows by id into a caller-provided buffer, casting to bf16 in the same pass
(numba kernel in `offload.kernels`).

The optimizer (`offload.optim.SparseAdamW`) is the only writer of `weights`/`exp_avg`/`exp_avg_sq`.

Zero-copy (`TransferScheduler(zero_copy=True)`): the scheduler attaches a `mirror` [N, W] in the wire
dtype (pinned and device-mapped by the copy engine), which the device reads rows from directly. The
store keeps it equal to `weights.to(mirror.dtype)`: the optimizer's update writes both in one pass, and
every other writer of `weights` here (`load_state_dict`, `set_weights`) refreshes it.

Shared per node (`RowStore(..., node=node_of(group))` under torch.distributed, several ranks on a node):
the four tensors are views of one segment of the node's shared memory (`offload.shared`), created,
filled (`init`) and host-RAM-checked by the node's local rank 0 and mapped by the others: one host copy
per node. Every rank of the node must build the same stores in the same order (a collective). Writers:
the row update splits the rows between the node's ranks by ownership (`SparseAdamW.step(owner=...)`,
then a node barrier, in `offload.updates`); `load_state_dict` / `set_weights` may run on every rank,
which then write the same bytes (harmless; the next row update follows a gradient all-reduce that
every rank reaches only after its load). A shared store's zero-copy mirror is shared too
(`alloc_mirror`). With one rank per node (or `node=None`) nothing changes: private memory, as in one
process.
"""

import ctypes
import math
import sys
from collections.abc import Callable

import numpy as np
import psutil
import torch

from offload import kernels
from offload.dtypes import STATE_DTYPES, WIRE_DTYPES
from offload.shared import alloc_shared
from offload.text import GiB

__all__ = ["RowStore", "HostRamError", "check_ids", "check_host_ram"]

_RAM_HEADROOM = 0.9  # refuse above this fraction of the currently available host RAM
_GiB = float(GiB)


def check_ids(ids, n_rows: int, name: str = "ids") -> np.ndarray:
    """Validate a row-id tensor (int64, rank 1, CPU, in range) and return its numpy view."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 row ids, got {type(ids).__name__}; "
                        f"pass torch.as_tensor(..., dtype=torch.int64)")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {ids.dtype}; pass {name}.long()")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be rank 1 [R], got shape {tuple(ids.shape)}; flatten it first")
    if ids.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {ids.device}; pass {name}.cpu()")
    ids_np = ids.contiguous().numpy()
    bad = kernels.first_bad_id(ids_np, n_rows)
    if bad >= 0:
        raise ValueError(f"{name}[{bad}] = {int(ids_np[bad])} is out of range for a store of {n_rows} rows; "
                         f"row ids must lie in [0, {n_rows})")
    return ids_np


class RowStore:
    """fp32 master rows + AdamW moments + per-row step counts, in ordinary (pageable) host RAM.

    init: "zeros", a tensor `[n_rows, width]` to copy, or a callable filling `weights` in place.
    state_dtype: dtype of exp_avg / exp_avg_sq (torch.float32 or torch.bfloat16).
    """

    def __init__(self, n_rows: int, width: int, *, init: str | torch.Tensor | Callable = "zeros",
                 state_dtype: torch.dtype = torch.float32, node=None):
        _check_shape_args(n_rows, width, state_dtype)
        _check_init(init, n_rows, width)
        self.n_rows, self.width, self.state_dtype = int(n_rows), int(width), state_dtype
        self.nbytes = self.bytes_needed(n_rows, width, state_dtype)
        # node: an offload.node.NodeGroup; with more than one rank on the node the store lives in the node's
        # shared memory (one host copy per node; collective over the node's ranks), else in private memory
        self.node = node if node is not None and node.local_world > 1 else None
        if self.node is None or self.node.leader:  # the node's other ranks allocate nothing
            _check_host_ram(self.nbytes, n_rows, width, state_dtype)
        if self.node is None:
            self.weights = self._alloc(torch.float32)     # [N, W] fp32 master rows
            self.exp_avg = self._alloc(state_dtype)       # [N, W] first moment
            self.exp_avg_sq = self._alloc(state_dtype)    # [N, W] second moment
            self.steps = self._alloc(torch.int64, (self.n_rows,))  # [N] per-row AdamW step
            for t in (self.exp_avg, self.exp_avg_sq, self.steps):
                t.zero_()
            self._init_weights(self.weights, init)
        else:
            self._alloc_on_node(init)
        self.mirror: torch.Tensor | None = None  # [N, W] wire dtype, zero-copy only (attach_mirror)
        self._mirror_np = None
        self._bind_numpy()

    @property
    def shared(self) -> bool:
        """The store lives in its node's shared memory (several ranks per node under torch.distributed)."""
        return self.node is not None

    def _layout(self) -> tuple[dict, int]:
        """name -> (dtype, shape, byte offset) of the four tensors in one segment (page aligned); total bytes."""
        out, off = {}, 0
        for name, dtype, shape in (("weights", torch.float32, (self.n_rows, self.width)),
                                   ("exp_avg", self.state_dtype, (self.n_rows, self.width)),
                                   ("exp_avg_sq", self.state_dtype, (self.n_rows, self.width)),
                                   ("steps", torch.int64, (self.n_rows,))):
            out[name] = (dtype, shape, off)
            off += -(-_nbytes(dtype, shape) // _PAGE) * _PAGE  # rounded up to a page
        return out, off

    def _alloc_on_node(self, init) -> None:
        """The four tensors as views of one segment of the node's shared memory; the leader fills it."""
        layout, total = self._layout()

        def views(buf: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: buf[off:off + _nbytes(dt, shape)].view(dt).view(shape)
                    for name, (dt, shape, off) in layout.items()}

        def fill(buf: torch.Tensor) -> None:  # the leader, before any other rank maps the segment
            v = views(buf)
            for name in ("exp_avg", "exp_avg_sq", "steps"):
                v[name].zero_()
            self._init_weights(v["weights"], init)

        buf = alloc_shared(self.node, total, fill, f"RowStore({self.n_rows} rows x {self.width})")
        for name, t in views(buf).items():
            _advise_huge_pages(t)
            setattr(self, name, t)

    def alloc_mirror(self, dtype: torch.dtype) -> torch.Tensor | None:
        """A shared store: the node's one mirror [N, W] `dtype` in its shared memory, filled from `weights` by
        the leader (collective over the node's ranks); pass it to `attach_mirror(..., filled=True)`. A private
        store: None (the caller allocates the mirror)."""
        if self.node is None:
            return None
        if dtype not in WIRE_DTYPES:
            raise TypeError(f"mirror dtype must be torch.float32 or torch.bfloat16, got {dtype}")

        def fill(buf: torch.Tensor) -> None:
            buf.view(dtype).view(self.n_rows, self.width).copy_(self.weights)

        buf = alloc_shared(self.node, _nbytes(dtype, (self.n_rows, self.width)), fill,
                           f"mirror of RowStore({self.n_rows} rows x {self.width})")
        return buf.view(dtype).view(self.n_rows, self.width)

    @staticmethod
    def bytes_needed(n_rows: int, width: int, state_dtype: torch.dtype = torch.float32) -> int:
        """Host bytes of a store: fp32 weights + two moments + int64 step per row."""
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        return int(n_rows) * (int(width) * (4 + 2 * STATE_DTYPES[state_dtype]) + 8)

    def _alloc(self, dtype, shape=None) -> torch.Tensor:
        shape = (self.n_rows, self.width) if shape is None else shape
        t = torch.empty(shape, dtype=dtype)  # not touched yet: the advice below applies at first touch
        _advise_huge_pages(t)
        return t

    @staticmethod
    def _init_weights(weights: torch.Tensor, init) -> None:
        if isinstance(init, str):
            weights.zero_()
        elif isinstance(init, torch.Tensor):
            weights.copy_(init)
        else:
            init(weights)

    def _bind_numpy(self) -> None:
        """numpy views used by the kernels (bf16 moments as uint16 bit patterns)."""
        self._w_np = kernels.as_numpy(self.weights)
        self._m_np = kernels.as_numpy(self.exp_avg)
        self._v_np = kernels.as_numpy(self.exp_avg_sq)
        self._steps_np = self.steps.numpy()

    def attach_mirror(self, mirror: torch.Tensor, *, filled: bool = False) -> None:
        """Keep `mirror` ([N, W] float32 or bfloat16, contiguous host tensor, e.g. pinned and mapped for a
        device) equal to `weights.to(mirror.dtype)` from now on; it is filled now unless `filled` (a shared
        mirror from `alloc_mirror`, filled by the node's leader)."""
        if not isinstance(mirror, torch.Tensor) or mirror.dtype not in WIRE_DTYPES:
            got = mirror.dtype if isinstance(mirror, torch.Tensor) else type(mirror).__name__
            raise TypeError(f"mirror must be a float32 or bfloat16 tensor, got {got}")
        if tuple(mirror.shape) != (self.n_rows, self.width) or mirror.device.type != "cpu" \
                or not mirror.is_contiguous():
            raise ValueError(f"mirror must be a contiguous CPU tensor [{self.n_rows}, {self.width}], got "
                             f"{tuple(mirror.shape)} on {mirror.device}")
        self.mirror, self._mirror_np = mirror, kernels.as_numpy(mirror)
        if not filled:
            self.refresh_mirror()

    def refresh_mirror(self) -> None:
        """Rewrite the whole mirror from `weights` (after a bulk write; the optimizer keeps it per row)."""
        if self.mirror is not None:
            self.mirror.copy_(self.weights)

    def set_weights(self, rows: torch.Tensor) -> None:
        """weights[:] = rows ([N, W], any float dtype), mirror included (loading a saved adapter)."""
        if tuple(rows.shape) != (self.n_rows, self.width):
            raise ValueError(f"rows have shape {tuple(rows.shape)}, expected ({self.n_rows}, {self.width})")
        self.weights.copy_(rows)
        self.refresh_mirror()

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[:R] = weights[ids] (cast to out's dtype, fp32 or bf16 round-to-nearest-even); returns out[:R].

        Plain PyTorch: `torch.index_select(self.weights, 0, ids).to(out.dtype)` written into out[:R].
        ids: [R] int64 CPU; out: [>=R, width] fp32 or bf16, contiguous, CPU.
        """
        ids_np = check_ids(ids, self.n_rows)
        n = ids_np.shape[0]
        if not isinstance(out, torch.Tensor) or out.dtype not in WIRE_DTYPES:
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"out must be a float32 or bfloat16 tensor, got {got}")
        if out.dim() != 2 or out.shape[1] != self.width or out.shape[0] < n:
            raise ValueError(f"out has shape {tuple(out.shape)}; it needs [>= {n}, {self.width}] "
                             f"(at least len(ids) rows of the store's width)")
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous CPU tensor (device {out.device}, "
                             f"contiguous={out.is_contiguous()}); preallocate it with torch.empty")
        kernels.gather_rows(self._w_np, ids_np, kernels.as_numpy(out))
        return out[:n]

    def state_dict(self) -> dict:
        """References (not copies) to every tensor, plus the shape and dtypes. Save with torch.save."""
        return {"n_rows": self.n_rows, "width": self.width, "state_dtype": str(self.state_dtype),
                "weights": self.weights, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        """Copy a state_dict into this store's buffers (moments may come in either state dtype)."""
        for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            if key not in sd:
                raise ValueError(f"state_dict has no {key!r}; expected a RowStore.state_dict()")
        if (sd.get("n_rows"), sd.get("width")) != (self.n_rows, self.width):
            got = (sd.get("n_rows"), sd.get("width"))
            raise ValueError(f"state_dict is for a store of (rows, width) = {got}, "
                             f"this store is ({self.n_rows}, {self.width}); build a matching RowStore")
        if sd["steps"].shape != self.steps.shape or sd["steps"].dtype != torch.int64:
            raise ValueError(f"state_dict['steps'] must be int64 [{self.n_rows}], got "
                             f"{sd['steps'].dtype} {tuple(sd['steps'].shape)}")
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            if tuple(sd[key].shape) != (self.n_rows, self.width) or not sd[key].is_floating_point():
                raise ValueError(f"state_dict[{key!r}] must be float [{self.n_rows}, {self.width}], "
                                 f"got {sd[key].dtype} {tuple(sd[key].shape)}")
        for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            getattr(self, key).copy_(sd[key])
        self.refresh_mirror()

    def __repr__(self) -> str:
        return (f"RowStore(n_rows={self.n_rows}, width={self.width}, state_dtype={self.state_dtype}, "
                f"{self.nbytes / _GiB:.3f} GiB)")


_MADV_HUGEPAGE, _HUGE = 14, 1 << 21
_PAGE = 4096  # tensors of a shared segment start on page boundaries
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages (2 MiB) under a store tensor. Gathers and updates touch
    random rows: with 4 KiB pages each row costs TLB misses (a 300 MB store spans ~150x what the TLB
    covers). `experiments/bench_offload.py` measures the gather on such stores (BENCHMARKS, "Offload
    core"). Advice only: where THP is off or the call fails, nothing changes."""
    if _libc is None or t.nbytes < 2 * _HUGE:
        return
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + t.nbytes) & ~(_HUGE - 1)
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _check_init(init, n_rows: int, width: int) -> None:
    if isinstance(init, str):
        if init != "zeros":
            raise ValueError(f"init must be 'zeros', a tensor or a callable, got {init!r}")
    elif isinstance(init, torch.Tensor):
        if tuple(init.shape) != (n_rows, width):
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, expected "
                             f"({n_rows}, {width}) = (n_rows, width)")
    elif not callable(init):
        raise TypeError(f"init must be 'zeros', a tensor or a callable, got {type(init).__name__}")


def _check_shape_args(n_rows, width, state_dtype) -> None:
    for name, val in (("n_rows", n_rows), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if state_dtype not in STATE_DTYPES:
        raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}; "
                        f"bf16 halves the moments' host RAM")


class HostRamError(MemoryError, ValueError):
    """Host RAM refused before allocating: a MemoryError, and a ValueError because a setting must change."""


def check_host_ram(needed: int, what: str, fixes) -> None:
    """Refuse (HostRamError) before allocating `needed` bytes of host RAM when that is more than 90% of what
    is available now. The one host-RAM rule: every store and `meft.wrap` (all layers at once) use it.
    `fixes(budget_bytes) -> str` says what would fit in the budget; `what` names the allocation."""
    available = psutil.virtual_memory().available
    budget = int(available * _RAM_HEADROOM)
    if needed <= budget:
        return
    raise HostRamError(
        f"{what} needs {needed / _GiB:.2f} GiB ({needed} bytes) of host RAM but only {available / _GiB:.2f} GiB "
        f"({available} bytes) is available (the limit is {_RAM_HEADROOM:.0%} of that). {fixes(budget)}")


def _check_host_ram(needed: int, n_rows: int, width: int, state_dtype) -> None:
    def fixes(budget: int) -> str:
        fit = {dt: budget // RowStore.bytes_needed(1, width, dt) for dt in STATE_DTYPES}
        bf16_total = RowStore.bytes_needed(n_rows, width, torch.bfloat16)
        return (f"Options that fit: at most {fit[torch.float32]} rows at width {width} with fp32 moments, or "
                f"{fit[torch.bfloat16]} rows with state_dtype=torch.bfloat16 (this size would need "
                f"{bf16_total / _GiB:.2f} GiB with bf16 moments); or fewer adapter rows / layers, or free host "
                "memory.")

    check_host_ram(needed, f"RowStore({n_rows} rows x {width}, {state_dtype} moments)", fixes)
