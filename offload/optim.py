"""SparseAdamW: lazy AdamW over one RowStore, plus its plain-PyTorch twin `reference_adamw_rows`.

Only rows that received a gradient since the last step are updated; each row keeps its own step
count for bias correction and gets decoupled weight decay only when touched. With every row touched
every step this is exactly `torch.optim.AdamW` (tested). Gradients of several micro-batches are summed
per row id in an fp32 pending buffer (`accumulate`), preallocated and grown geometrically, so nothing
is allocated per step after warm-up. A step whose (scaled) gradient holds inf/NaN is skipped for the
whole store and counted in `skipped_steps`; the store is left untouched. `step()` consumes the
pending gradients either way. `step_rows(ids, grads)` is accumulate + step for a single micro-batch
without the copy into the pending buffer.

Sparse update (MeftConfig.sparse_update): `accumulate` and `step_rows` take an optional per-row mask
`keep` [R] bool; a row with keep False is as if it had not been pushed: no pending gradient, no update,
its weights, moments and step count untouched (`step_rows` hands the mask to the fused kernel, which
skips those rows; `accumulate` leaves them out of the pending buffer). Its gradient is ignored, even a
non-finite one.

The arithmetic lives in `offload.kernels.adamw_rows` (numba, fused, in place). `rule="sgd"` updates the same
rows with plain SGD instead (`offload.sgd_kernel.sgd_rows`: lr x gradient, decoupled weight decay; the
moments are neither read nor written), the row update of sparse memory finetuning.
"""

import math
import warnings

import numpy as np
import torch

from offload import kernels
from offload.dtypes import WIRE_DTYPES
from offload.sgd_kernel import sgd_rows
from offload.store import RowStore, check_ids

__all__ = ["SparseAdamW", "reference_adamw_rows", "RULES"]

RULES = ("adamw", "sgd")  # row update rules: lazy AdamW (default), plain SGD (offload.sgd_kernel)

_F32_MAX_BITS = 0x7F800000  # abs bit patterns >= this are inf/NaN
_MIN_CAPACITY = 64


class SparseAdamW:
    """Lazy AdamW over the rows of `store` that were given gradients (see module docstring)."""

    def __init__(self, store: RowStore, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rule: str = "adamw"):
        if not isinstance(store, RowStore):
            raise TypeError(f"store must be an offload.RowStore, got {type(store).__name__}")
        _check_hparams(lr, betas, eps, weight_decay)
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} must be one of {', '.join(map(repr, RULES))} (the row update: "
                             "AdamW, or plain SGD as sparse memory finetuning uses)")
        self.rule = rule  # "adamw" | "sgd" (offload.sgd_kernel: no moments read or written)
        self.store = store
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.skipped_steps = 0
        self._warned = False
        n = store.n_rows
        self._slot_of = np.full(n, -1, dtype=np.int64)   # [N] row id -> pending slot or -1
        self._stamp = np.zeros(n, dtype=np.int64)        # [N] last accumulate() call that saw the id
        self._call_no = 0
        self._n = 0                                      # pending rows
        self._capacity = 0
        self._grow(min(n, _MIN_CAPACITY))

    # ------------------------------------------------------------------ pending gradient buffer

    def _grow(self, needed: int) -> None:
        cap = min(self.store.n_rows, max(needed, 2 * self._capacity, _MIN_CAPACITY))
        pending = torch.empty((cap, self.store.width), dtype=torch.float32)  # [C, W] fp32 row grads
        ids = np.empty(cap, dtype=np.int64)                                   # [C] row id of slot
        maxbits = np.zeros(cap, dtype=np.uint32)                              # [C] max |g| bits per slot
        slots = np.empty(cap, dtype=np.int64)                                 # [C] scratch: slot per row
        fresh = np.empty(cap, dtype=np.bool_)                                 # [C] scratch: slot is new
        if self._n:
            pending[: self._n].copy_(self._pending[: self._n])
            ids[: self._n] = self._pending_ids[: self._n]
            maxbits[: self._n] = self._maxbits[: self._n]
        self._pending, self._pending_np = pending, pending.numpy()
        self._pending_ids, self._maxbits, self._slots, self._fresh = ids, maxbits, slots, fresh
        self._capacity = cap

    @property
    def pending_rows(self) -> int:
        """Number of distinct rows holding a pending gradient."""
        return self._n

    def pending_ids(self) -> torch.Tensor:
        """Copy of the ids with pending gradients, in slot order. [n] int64."""
        return torch.from_numpy(self._pending_ids[: self._n].copy())

    def pending_grads(self) -> torch.Tensor:
        """The pending gradients, rows in the order of `pending_ids()`: [n, W] fp32, a view of the buffer
        (valid until the next accumulate / step / zero_grad)."""
        return self._pending[: self._n]

    def accumulate(self, ids: torch.Tensor, grads: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """pending[ids[r]] += grads[r]. ids: [R] int64 unique; grads: [R, W] fp32 or bf16, CPU.
        keep: None, or [R] bool (CPU): rows with keep False are left out (a sparse update's mask).

        Repeated ids across calls sum (micro-batches); an id repeated inside one call is an error.
        On any error nothing changes.
        """
        ids_np = check_ids(ids, self.store.n_rows)
        grads_np = self._check_grads(grads, ids_np.shape[0])
        if keep is not None:
            keep_np = _check_keep(keep, ids_np.shape[0])
            if not keep_np.all():  # host arrays: the masked rows are simply not accumulated
                ids_np, grads_np = ids_np[keep_np], grads_np[keep_np]
        r = ids_np.shape[0]
        if self._n + r > self._capacity:
            self._grow(self._n + r)
        self._call_no += 1
        n_new = kernels.plan_slots(ids_np, self._slot_of, self._stamp, self._call_no, self._pending_ids,
                                   self._n, self._slots, self._fresh)
        if n_new < 0:
            q = -n_new - 1
            first = int(np.nonzero(ids_np[:q] == ids_np[q])[0][0])
            raise ValueError(f"ids has a duplicate inside one accumulate() call: ids[{first}] == ids[{q}] == "
                             f"{int(ids_np[q])}; sum them first (index_add_) or pass unique ids")
        self._n = n_new
        kernels.accumulate_rows(self._pending_np, self._slots[:r], self._fresh[:r], grads_np, self._maxbits)

    def _check_grads(self, grads, n_ids: int) -> np.ndarray:
        width = self.store.width
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a torch.Tensor [R, {width}], got {type(grads).__name__}")
        if grads.dtype not in WIRE_DTYPES:
            raise TypeError(f"grads must be float32 or bfloat16, got {grads.dtype}; pass grads.float()")
        if grads.dim() != 2 or tuple(grads.shape) != (n_ids, width):
            raise ValueError(f"grads has shape {tuple(grads.shape)}, expected ({n_ids}, {width}) = "
                             f"(len(ids), store.width)")
        if grads.device.type != "cpu":
            raise ValueError(f"grads must be on the CPU, got device {grads.device}; pass grads.cpu()")
        return kernels.as_numpy(grads.contiguous())

    def grad_sq_norm(self) -> float:
        """Sum of squares of the pending (unscaled) gradient, in float64 (inf/NaN if non-finite)."""
        if self._n == 0:
            return 0.0
        return float(kernels.sum_sq_rows(self._pending_np, self._n))

    # ------------------------------------------------------------------ update

    def _finite(self, grad_scale: float, top: int | None = None) -> bool:
        """Exact: every g * grad_scale (fp32) is finite, from the max |g| bits (default: of the pending rows)."""
        if not math.isfinite(grad_scale):
            return False
        top = int(self._maxbits[: self._n].max()) if top is None else top
        if top >= _F32_MAX_BITS:
            return False
        max_abs = np.array([top], dtype=np.uint32).view(np.float32)[0]
        with np.errstate(over="ignore"):
            return bool(np.isfinite(max_abs * np.float32(grad_scale)))

    def owned(self, owner: tuple[int, int]) -> np.ndarray:
        """[n] bool: which pending rows (slot order) `owner` = (index, count) updates: id % count == index."""
        index, count = owner
        if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"owner={owner!r} must be (index, count) with 0 <= index < count")
        return self._pending_ids[: self._n] % count == index

    def hparams(self) -> tuple[float, tuple[float, float], float, float]:
        """(lr, betas, eps, weight_decay) as they are now: a snapshot an asynchronous update can carry, so
        that changing `lr` on another thread while the update waits in a queue cannot change its result."""
        return self.lr, self.betas, self.eps, self.weight_decay

    def step(self, grad_scale: float = 1.0, *, hparams: tuple | None = None,
             owner: tuple[int, int] | None = None) -> bool:
        """Apply pending grads * grad_scale to the touched rows, then drop them.

        `hparams` (from `hparams()`) overrides the current hyper-parameters for this step only.
        `owner` = (index, count): update only the pending rows with id % count == index (a store shared by
        the `count` ranks of a node, each holding the same pending gradients: together they update every row
        once; the caller waits for the others before reading the rows). Rows are independent, so each row
        gets exactly the update `owner=None` gives it; the inf/NaN check covers every pending row, so every
        owner takes the same decision.
        Returns False (and counts `skipped_steps`, store untouched) when a scaled gradient is inf/NaN.
        """
        _check_scale(grad_scale)
        if self._n == 0:
            return True
        ids_np, grads_np = self._pending_ids[: self._n], self._pending_np
        if owner is not None:
            mine = self.owned(owner)  # [n] bool over the pending slots
            ids_np, grads_np = ids_np[mine], grads_np[: self._n][mine]  # [n_mine], [n_mine, W]
        ok = self._finite(float(grad_scale)) and self._update(ids_np, grads_np, grad_scale, hparams)
        if not ok:
            self._skip(grad_scale)
        self.zero_grad()
        return ok

    def step_rows(self, ids: torch.Tensor, grads: torch.Tensor, grad_scale: float = 1.0, *,
                  hparams: tuple | None = None, keep: torch.Tensor | None = None) -> bool:
        """`accumulate(ids, grads, keep)` then `step(grad_scale, hparams=hparams)` in one pass, without the
        copy into the pending buffer (one micro-batch per step). Needs no pending gradients; same checks,
        same result. `keep` [R] bool goes to the kernel, which skips the masked rows."""
        if self._n:
            raise RuntimeError(f"step_rows() needs an empty pending buffer, but {self._n} rows hold gradients "
                               f"from accumulate(); call step() or zero_grad() first")
        _check_scale(grad_scale)
        ids_np = check_ids(ids, self.store.n_rows)
        grads_np = self._check_grads(grads, ids_np.shape[0])
        keep_np = None if keep is None else _check_keep(keep, ids_np.shape[0])
        r = ids_np.shape[0]
        if r > self._capacity:
            self._grow(r)
        self._call_no += 1
        n_new = kernels.plan_slots(ids_np, self._slot_of, self._stamp, self._call_no, self._pending_ids, 0,
                                   self._slots, self._fresh)  # only to detect duplicates; released below
        if n_new < 0:
            raise ValueError(f"ids has a duplicate at position {-n_new - 1} (value {int(ids_np[-n_new - 1])}); "
                             f"pass unique ids")
        kernels.release_slots(self._pending_ids, n_new, self._slot_of)
        top = kernels.max_abs_bits(grads_np, r, self._maxbits)
        if keep_np is not None:  # a masked row's gradient is ignored, a non-finite one included
            top = int(self._maxbits[:r][keep_np].max(initial=0))
        ok = self._finite(float(grad_scale), top) and self._update(ids_np, grads_np, grad_scale, hparams, keep_np)
        if not ok:
            self._skip(grad_scale)
        return ok

    def _update(self, ids_np: np.ndarray, grads_np: np.ndarray, grad_scale: float,
                hparams: tuple | None = None, keep_np: np.ndarray | None = None) -> bool:
        lr, betas, eps, wd = hparams if hparams is not None else self.hparams()
        _check_hparams(lr, betas, eps, wd)
        s = self.store
        if self.rule == "sgd":
            sgd_rows(s._w_np, s._steps_np, ids_np, grads_np, float(grad_scale), lr, wd, s._mirror_np, keep_np)
            return True
        kernels.adamw_rows(s._w_np, s._m_np, s._v_np, s._steps_np, ids_np, grads_np, float(grad_scale),
                           lr, betas[0], betas[1], eps, wd, s._mirror_np,  # the zero-copy mirror in the same pass
                           keep_np)
        return True

    def _skip(self, grad_scale) -> None:
        self.skipped_steps += 1
        if not self._warned:
            warnings.warn(f"SparseAdamW: non-finite gradient (grad_scale={grad_scale}); step skipped, "
                          f"store unchanged (counted in skipped_steps; warned once)", stacklevel=3)
            self._warned = True

    def zero_grad(self) -> None:
        """Drop all pending gradients (buffers are kept for reuse)."""
        kernels.release_slots(self._pending_ids, self._n, self._slot_of)
        self._n = 0

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """Hyper-parameters, skipped-step count and the store's state_dict (moments, steps, weights).

        Pending (not yet applied) gradients are not saved: checkpoint at a step boundary.
        """
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "rule": self.rule, "skipped_steps": self.skipped_steps, "store": self.store.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore hyper-parameters (and the store when `sd` holds one); drops pending gradients."""
        missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in sd]
        if missing:
            raise ValueError(f"state_dict is missing {missing}; expected a SparseAdamW.state_dict()")
        _check_hparams(sd["lr"], sd["betas"], sd["eps"], sd["weight_decay"])
        rule = sd.get("rule", "adamw")  # states saved before the rule existed are AdamW's
        if rule != self.rule:
            raise ValueError(f"state_dict was saved by a rule={rule!r} optimizer, this one has rule={self.rule!r}; "
                             "build it with the same rule (MeftConfig.row_optimizer)")
        if "store" in sd:
            self.store.load_state_dict(sd["store"])
        self.lr, self.betas = float(sd["lr"]), (float(sd["betas"][0]), float(sd["betas"][1]))
        self.eps, self.weight_decay = float(sd["eps"]), float(sd["weight_decay"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        self.zero_grad()


def _check_keep(keep, n_ids: int) -> np.ndarray:
    """A sparse update's per-row mask: [R] bool on the CPU -> its numpy view."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n_ids,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise TypeError(f"keep must be a bool tensor [{n_ids}] (one flag per id), got {got}")
    if keep.device.type != "cpu":
        raise ValueError(f"keep must be on the CPU, got device {keep.device}; pass keep.cpu()")
    return keep.contiguous().numpy()


def _check_scale(grad_scale) -> None:
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)):
        raise TypeError(f"grad_scale must be a float, got {type(grad_scale).__name__}")


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")


def reference_adamw_rows(weights, exp_avg, exp_avg_sq, steps, ids, grads, *, lr, betas, eps,
                         weight_decay, keep=None) -> None:
    """Plain-PyTorch twin of `kernels.adamw_rows` (and of torch.optim.AdamW per row), in place.

    weights: [N, W] fp32; exp_avg, exp_avg_sq: [N, W] fp32 or bf16; steps: [N] int64;
    ids: [R] int64 unique; grads: [R, W] any float dtype (math in fp32); keep: None or [R] bool (rows
    with False are skipped whole, as the kernel skips them). Boolean indexing: a twin, it may synchronise.
    """
    if keep is not None:
        keep = keep.to(ids.device)
        ids, grads = ids[keep], grads[keep.to(grads.device)]
    beta1, beta2 = betas
    steps[ids] += 1
    t = steps[ids].double().unsqueeze(1)                                  # [R, 1]
    neg_step = (-(lr / (1.0 - beta1**t))).float()                         # [R, 1]
    bc2_sqrt = (1.0 - beta2**t).sqrt().float()                            # [R, 1]
    g = grads.float()                                                     # [R, W]
    w = weights.index_select(0, ids) * (1.0 - lr * weight_decay)          # [R, W]
    m = exp_avg.index_select(0, ids).float().lerp_(g, 1.0 - beta1)       # [R, W]
    v = exp_avg_sq.index_select(0, ids).float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.sqrt() / bc2_sqrt + eps
    w.addcmul_(neg_step, m / denom)
    weights.index_copy_(0, ids, w)
    exp_avg.index_copy_(0, ids, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, ids, v.to(exp_avg_sq.dtype))
