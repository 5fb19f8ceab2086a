"""Lomo and AdaLomo: full-parameter backbone updates fused into backward (arXiv 2306.09782, 2310.10195).

Owns the two update rules; the hook machinery, clipping, distributed averaging and bookkeeping live in
meft.lomo.fused, stochastic rounding in meft.lomo.rounding.

Each owned parameter is updated in place by a `register_post_accumulate_grad_hook` as soon as its
gradient is complete, and its `.grad` is freed right away: no gradient buffer for the whole model and
(Lomo) no optimizer state. Math is fp32; bf16 parameters are written back rounded to nearest, or with
unbiased stochastic rounding (`stochastic_rounding=True`, reproducible: the noise is seeded from
(seed, parameter index, parameter step), so resuming from a state_dict continues bit for bit). Each
update walks its parameter in row chunks of at most `chunk_bytes` (default 4 MiB) of fp32, so the fp32
working copies of a bf16 parameter, its gradient and AdaLomo's update never exist for the whole tensor
at once. Lomo's chunked update is bitwise the whole-tensor one; AdaLomo sums its column means and update
RMS chunk by chunk, equal to the whole-tensor reductions up to fp32 rounding.

Training loop (both are `torch.optim.Optimizer`s, so any `torch.optim.lr_scheduler` drives `lr`):

    opt = meft.Lomo(model, lr=1e-3)             # a model (its requires_grad params) or params / groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ...)
    for batch in data:
        loss = model(**batch).loss
        opt.backward(loss)      # = loss.backward(); with clip="global" it runs the two passes
        opt.step()              # ends the step: no math (the update happened in backward), checks
        sched.step()            # the new lr is used by the next backward

`step()` must be called once after each backward: a parameter receiving a second gradient before
`step()` is gradient accumulation, which a fused update cannot do, and raises. `zero_grad()` is a no-op.

Clipping (`clip=`, threshold `max_norm`): "none"; "value" (each gradient element to [-max_norm,
max_norm]); "tensor" (each parameter's gradient to L2 norm <= max_norm, one pass); "global" (all owned
gradients to total L2 norm <= max_norm, as clip_grad_norm_). "global" needs two backward passes: the
first (inside `with opt.norm_pass():`, `retain_graph=True`) only measures and updates nothing, the
second updates; `opt.backward(loss)` does both. A backward that would update under clip="global"
without a fresh norm pass of this step raises before touching any parameter. A non-finite global norm
skips the step (`opt.skipped_steps`); the norm is kept in `opt.last_grad_norm`. AdaLomo also clips
each update by its RMS (`clip_threshold`, as Adafactor), independently of `clip`.

Distributed: if torch.distributed is initialized with world size > 1 when the optimizer is built, the
owned parameters are broadcast from rank 0, and each hook all-reduces its gradient (fp32 sum / world
size) before the update, so replicas stay identical. Give each rank its own data and do NOT wrap the
model in DistributedDataParallel: DDP's reducer runs after our hook (it would re-create `.grad` and
reduce again), so a DDP/FSDP-wrapped model or sharded (DTensor / FlatParameter) parameters are
refused, and `step()` raises if an owned parameter holds `.grad` again. Every rank must run the same
graph (same hook order). Parameters the optimizer does not own keep their `.grad` (reduce those
yourself, e.g. with a separate optimizer). fp16 parameters and fp16 GradScaler are refused (use bf16).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from meft.lomo.chunks import Chunks
from meft.lomo.fused import CHUNK_BYTES, FusedBackwardOptimizer

__all__ = ["Lomo", "AdaLomo"]


class Lomo(FusedBackwardOptimizer):
    """SGD with decoupled weight decay, fused into backward: p <- p * (1 - lr * wd) - lr * g."""
    _rowwise = True  # each element's update reads only its own gradient: rows may be updated in parts
    def __init__(self, params, lr: float = 1e-3, *, weight_decay: float = 0.0, clip: str = "none",
                 max_norm: float = 1.0, stochastic_rounding: bool = False, seed: int = 0,
                 chunk_bytes: int = CHUNK_BYTES, process_group=None):
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, clip=clip, max_norm=max_norm,
                         stochastic_rounding=stochastic_rounding, seed=seed, chunk_bytes=chunk_bytes,
                         process_group=process_group)

    def _update(self, p: Tensor, chunks: Chunks, group: dict, state: dict) -> None:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        for rows in chunks:
            p32 = chunks.param(rows)
            if wd != 0:
                p32.mul_(1.0 - lr * wd)
            p32.add_(chunks.grad(rows), alpha=-lr)
            chunks.store(rows, p32)


class AdaLomo(FusedBackwardOptimizer):
    """Adafactor without momentum, fused into backward (AdaLomo).

    Per parameter, with t its step and g its (clipped) gradient:
      v_t = b_t v_{t-1} + (1 - b_t)(g^2 + eps[0]),  b_t = 1 - t^decay_rate; factored for >= 2-D
            parameters (row means [.., R] and column means [.., C], Adafactor's rank-1 estimate),
            full for vectors
      u   = g / sqrt(v_t), then u /= max(1, RMS(u) / clip_threshold)
      lr_t = lr * max(eps[1], RMS(p))                      (relative step)
      p  <- p * (1 - weight_decay * lr_t) - lr_t * u        (decoupled decay, Adafactor's convention)
    Equals transformers' Adafactor(beta1=None, scale_parameter=True, relative_step=False,
    warmup_init=False). State (`step`, `exp_avg_sq_row` / `exp_avg_sq_col` or `exp_avg_sq`, fp32)
    lives in `self.state`, so state_dict() / load_state_dict() resume exactly.
    """

    def __init__(self, params, lr: float = 1e-3, *, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 clip: str = "none", max_norm: float = 1.0, stochastic_rounding: bool = False,
                 seed: int = 0, chunk_bytes: int = CHUNK_BYTES, process_group=None):
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} must be >= 0")
        if len(eps) != 2 or not (eps[0] >= 0 and eps[1] >= 0):
            raise ValueError(f"eps={eps!r} must be two numbers >= 0 (eps for v, eps for the relative step)")
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold={clip_threshold!r} must be > 0 (use math.inf to disable)")
        if not decay_rate < 0:
            raise ValueError(f"decay_rate={decay_rate!r} must be < 0 (Adafactor uses -0.8)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        defaults = {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults, clip=clip, max_norm=max_norm,
                         stochastic_rounding=stochastic_rounding, seed=seed, chunk_bytes=chunk_bytes,
                         process_group=process_group)

    def init_state(self) -> list[Tensor]:
        """Create every parameter's state now (what the first update would create) and return its tensors.
        `meft plan` uses it to count AdaLomo's steady-state memory before any step has run."""
        out = []
        for p in self._params:
            st = self.state[p]
            if not st:
                self._init_state(p, st)
            out += [t for t in st.values() if isinstance(t, Tensor)]
        return out

    @staticmethod
    def _init_state(p: Tensor, state: dict) -> None:
        state["step"] = 0
        shape = p.shape
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=p.device)  # [.., R]
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32,
                                                  device=p.device)  # [.., C]
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _update(self, p: Tensor, chunks: Chunks, group: dict, state: dict) -> None:
        # Three passes over the rows, each holding one chunk's fp32 temporaries: the second moment (needs
        # all rows before any update), the update RMS (needs the whole update before clipping), the update.
        if p.numel() == 0:
            return  # nothing to update, and no RMS of zero elements
        eps1, eps2 = group["eps"]
        rms_p = chunks.norm(p) / (p.numel() ** 0.5)
        lr_t = torch.clamp(rms_p, min=eps2) * float(group["lr"])  # 0-d, relative step
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]  # [.., R], [.., C]
            row_mean = row.new_empty(row.shape, dtype=chunks.dtype)  # [.., R]
            col_mean = col.new_zeros(col.shape, dtype=chunks.dtype)  # [.., C]: summed chunk by chunk
            for rows in chunks:
                sq = chunks.grad(rows).square().add_(eps1)  # [.., r, C]
                row_mean.narrow(-1, *rows).copy_(sq.mean(dim=-1))
                col_mean.add_(sq.sum(dim=-2))
            col_mean.div_(p.shape[-2])  # as mean(dim=-2) does: sum, then divide
            row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [.., R, 1]
            c_factor = col.unsqueeze(-2).rsqrt()  # [.., 1, C]

            def unclipped(rows: tuple[int, int]) -> Tensor:
                return torch.mul(r_factor.narrow(-2, *rows), c_factor).mul_(chunks.grad(rows))  # [.., r, C]
        else:
            v = state["exp_avg_sq"]
            for rows in chunks:
                sq = chunks.grad(rows).square().add_(eps1)
                chunks.view(v, rows).mul_(beta2t).add_(sq, alpha=1.0 - beta2t)

            def unclipped(rows: tuple[int, int]) -> Tensor:
                return chunks.view(v, rows).rsqrt().mul_(chunks.grad(rows))
        norms = [torch.linalg.vector_norm(unclipped(rows)) for rows in chunks]
        rms_u = torch.linalg.vector_norm(torch.stack(norms)) / (p.numel() ** 0.5)
        denom = (rms_u / group["clip_threshold"]).clamp_(min=1.0)
        decay = 1.0 - group["weight_decay"] * lr_t if group["weight_decay"] != 0 else None
        for rows in chunks:
            update = unclipped(rows).div_(denom).mul_(lr_t)
            p32 = chunks.param(rows)
            if decay is not None:
                p32.mul_(decay)
            p32.sub_(update)
            chunks.store(rows, p32)
