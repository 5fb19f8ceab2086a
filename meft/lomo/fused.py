"""Machinery shared by Lomo and AdaLomo (meft/lomo/optimizers.py): parameter updates fused into backward.

Owns `FusedBackwardOptimizer`: one `register_post_accumulate_grad_hook` per owned parameter (O(1) work
per hook: the hook knows its parameter's index), gradient clipping (none / value / per tensor / global
norm with two backward passes), the cross-rank gradient average, step bookkeeping (`state["step"]`),
misuse checks and a dtype-preserving `load_state_dict`; one parameter's update is walked in row chunks
(`meft.lomo.chunks.Chunks`). Subclasses implement `_update(p, chunks, group, state)`: the
in-place update of one parameter, chunk by chunk, so that no fp32 temporary of a whole tensor exists (a
bf16 model's 49152 x 576 tied embedding would need 108 MiB per temporary, at the end of backward).

Row parts (`rows_update_ok`, `begin_rows`, `update_rows`): for a row-separable rule (Lomo) a parameter's
update may be applied in row parts, each row once with its whole gradient, as meft.lomo.head does for the
tied LM head during its backward (no [V, d] gradient); it counts as the parameter's one update of the step.

Step contract (see meft.lomo.optimizers for the user-facing description):
  backward     the hook of each owned parameter fires once its gradient is complete: average across
               ranks, clip, update in place, free `.grad`. Tied parameters are one tensor: one update.
  step()       ends the step: no math; checks the step was complete and no owned `.grad` came back,
               clears the per-step bookkeeping. A second update of a parameter before step() is
               gradient accumulation, which is refused.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from meft.lomo.chunks import Chunks, math_dtype
from meft.lomo.rounding import rounding_generator

__all__ = ["FusedBackwardOptimizer", "Chunks", "CLIP_MODES", "CHUNK_BYTES"]

CLIP_MODES = ("none", "value", "tensor", "global")
CHUNK_BYTES = 4 * 2**20  # default fp32 size of one update chunk: small next to a layer, large enough per kernel
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> weakref(optimizer whose hook it carries)

_ACCUM_MSG = (
    "parameter {name} got a second gradient before opt.step(): gradient accumulation (or a missing "
    "opt.step() between backward passes) is impossible with a fused optimizer, whose update happens "
    "inside backward. Call opt.step() after every backward and use accumulation steps = 1 (use a larger "
    "micro-batch with gradient checkpointing instead), or use a regular optimizer such as "
    "torch.optim.AdamW when you need gradient accumulation."
)
_NO_NORM_MSG = (
    "clip='global' needs the global gradient norm before any update: run the norm pass first, e.g. "
    "`opt.backward(loss)` (does both passes), or `with opt.norm_pass(): loss.backward(retain_graph=True)` "
    "followed by `loss.backward()`, then `opt.step()`."
)
_SCALER_MSG = (
    "an fp16 GradScaler cannot drive {cls}: the update happens inside backward, before the scaler can "
    "unscale gradients or skip a step with inf/NaN. Use bf16 autocast or bf16/fp32 parameters (no loss "
    "scaling needed; stochastic_rounding=True keeps small bf16 updates), or torch.optim.AdamW with fp16."
)


def _params_from(params) -> list:
    """A module -> its trainable parameters (refusing DDP/FSDP wrappers); anything else is passed through."""
    if not isinstance(params, nn.Module):
        if isinstance(params, Tensor):
            raise TypeError("params is a single Tensor; pass a model, a list of parameters or param groups")
        return list(params)
    for m in params.modules():
        kind = type(m).__name__
        if kind in ("DistributedDataParallel", "FullyShardedDataParallel") or kind.startswith("FSDP"):
            raise ValueError(
                f"the model is wrapped in {kind}; fused optimizers must not be combined with it: its own "
                "gradient reduction runs after our in-backward update (updating with local gradients) and "
                "re-creates .grad. Pass the unwrapped model: with torch.distributed initialized, "
                "Lomo/AdaLomo average each gradient across ranks themselves before updating."
            )
    return [p for p in params.parameters() if p.requires_grad]


def _is_sharded(p: Tensor) -> bool:
    return type(p).__name__ in ("DTensor", "FlatParameter") or hasattr(p, "_local_tensor")


class FusedBackwardOptimizer(Optimizer):
    """Base class: see the module docstring. Not used directly; use meft.Lomo / meft.AdaLomo."""
    _step_supports_amp_scaling = True  # makes GradScaler.step hand itself over, so it can be refused

    def __init__(self, params, defaults: dict, *, clip: str = "none", max_norm: float = 1.0,
                 stochastic_rounding: bool = False, seed: int = 0, chunk_bytes: int = CHUNK_BYTES,
                 process_group=None):
        if clip not in CLIP_MODES:
            raise ValueError(f"clip={clip!r} is not one of {CLIP_MODES}")
        if clip != "none" and not max_norm > 0:
            raise ValueError(f"max_norm={max_norm!r} must be > 0 with clip={clip!r}")
        if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes of fp32 per update chunk)")
        self.clip, self.max_norm, self.chunk_bytes = clip, float(max_norm), chunk_bytes
        self.stochastic_rounding, self.seed = bool(stochastic_rounding), int(seed)
        self._params: list[Tensor] = []
        self._group_of: list[int] = []  # [n_params] index into self.param_groups
        self._ids: dict[int, int] = {}  # id(param) -> index
        self._handles: list = []
        self._updated = bytearray()  # [n_params] 1 once the parameter was updated in this step
        self._n_updated = 0
        self._in_norm_pass = False
        self._norms: dict[int, Tensor] = {}  # index -> grad norm, filled by the running norm pass
        self._clip_coef: Tensor | None = None  # from this step's finished norm pass
        self._coef_on: dict[torch.device, Tensor] = {}
        self._skip = False  # this step's global norm is not finite: free gradients, update nothing
        self._generators: dict[torch.device, torch.Generator] = {}
        self.last_grad_norm: Tensor | None = None  # global norm of the last norm pass (clip='global')
        self.steps_done = 0
        self.skipped_steps = 0
        plist = _params_from(params)
        self._group = process_group
        self._world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        try:
            super().__init__(plist, defaults)
        except BaseException:
            self.remove_hooks()  # leave no hook behind on the parameters adopted so far
            raise

    # ---- ownership and hooks -------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        for p in self.param_groups[gi]["params"]:
            self._adopt(p, gi)

    def _adopt(self, p: Tensor, gi: int) -> None:
        name = f"#{len(self._params)} {tuple(p.shape)}"
        if id(p) in self._ids:
            raise ValueError(f"parameter {name} is listed twice; list each (tied) parameter once")
        if not p.is_leaf or not p.requires_grad:
            raise ValueError(f"parameter {name} must be a leaf tensor with requires_grad=True")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(
                f"parameter {name} has dtype {p.dtype}; fused updates support fp32, bf16 and fp64. fp16 "
                "needs loss scaling, which cannot be fused: use bf16 (stochastic_rounding=True) or fp32"
            )
        if _is_sharded(p):
            raise ValueError(
                f"parameter {name} is a {type(p).__name__} (FSDP/tensor parallel): each rank holds a shard "
                "whose gradient is reduce-scattered by FSDP after our hook, so a fused update cannot be "
                "correct. Use plain (replicated) parameters: Lomo/AdaLomo average gradients themselves"
            )
        owner = _OWNERS.get(p)
        if owner is not None and owner() is not None and owner() is not self:
            raise ValueError(
                f"parameter {name} is already updated by another Lomo/AdaLomo (two updates per step); "
                "call old_optimizer.remove_hooks() first"
            )
        idx = len(self._params)
        self._ids[id(p)] = idx
        self._params.append(p)
        self._group_of.append(gi)
        self._updated.append(0)
        _OWNERS[p] = weakref.ref(self)
        if self._world > 1:  # start from identical replicas, as DDP does
            src = dist.get_global_rank(self._group, 0) if self._group is not None else 0
            dist.broadcast(p.detach(), src=src, group=self._group)
        self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(idx)))

    def _make_hook(self, idx: int):
        def hook(p: Tensor) -> None:
            self._on_grad(p, idx)
        return hook

    def remove_hooks(self) -> None:
        """Detach this optimizer from its parameters (afterwards backward keeps `.grad` as usual)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._params:
            if _OWNERS.get(p) is not None and _OWNERS[p]() is self:
                del _OWNERS[p]

    # ---- the hook ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, p: Tensor, idx: int) -> None:
        grad = p.grad
        if grad is None:
            return
        p.grad = None  # freed once this hook returns
        if grad.is_sparse:
            raise RuntimeError(f"parameter #{idx} has a sparse gradient; fused updates need dense ones")
        if self._world > 1:  # gloo has no AVG: sum in fp32 (a whole fp32 copy of a bf16 gradient), divide
            grad = grad.to(math_dtype(grad))
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self._group)
            grad.div_(self._world)
        if self._in_norm_pass:
            self._norms[idx] = Chunks(p, grad, self.chunk_bytes).norm(grad)
            return
        self._begin_update(idx)
        if self._skip:
            return
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        state["step"] += 1
        self._update(p, self._chunks(p, grad, idx, state["step"]), self.param_groups[self._group_of[idx]], state)

    def _begin_update(self, idx: int) -> None:
        if self._updated[idx]:
            raise RuntimeError(_ACCUM_MSG.format(name=f"#{idx} {tuple(self._params[idx].shape)}"))
        if self.clip == "global":
            if self._clip_coef is None:
                raise RuntimeError(_NO_NORM_MSG)
            if idx not in self._norms:
                raise RuntimeError(
                    f"parameter #{idx} got a gradient in the update pass but not in the norm pass: both "
                    "passes must backward the same loss (use opt.backward(loss))"
                )
        self._updated[idx] = 1
        self._n_updated += 1

    def _chunks(self, p: Tensor, grad: Tensor, idx: int, step: int) -> Chunks:
        """The chunked view of this update: this step's global clip coefficient, the rounding generator
        seeded from (seed, parameter index, parameter step)."""
        coef = None
        if self.clip == "global":
            coef = self._coef_on.get(grad.device)
            if coef is None:
                coef = self._coef_on[grad.device] = self._clip_coef.to(grad.device)
        gen = None
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            gen = self._generators.get(p.device)
            if gen is None:
                gen = self._generators[p.device] = torch.Generator(device=p.device)
            rounding_generator(gen, self.seed, idx, step)
        return Chunks(p, grad, self.chunk_bytes, clip=self.clip, max_norm=self.max_norm, coef=coef, rounding=gen)

    # ---- updates in row parts (meft.lomo.head: the tied LM head's rows during its backward) -----------
    def rows_update_ok(self, p: Tensor) -> bool:
        """Whether `p`'s update may be applied in row parts (each row once, with its whole gradient) with
        the result of one update: the rule is row-separable (`_rowwise`, Lomo), `p` is owned and hooked, and
        nothing needs the whole gradient first (clip 'none' / 'value', no stochastic rounding, whose noise
        is drawn in row order, no cross-rank average, not in a norm pass)."""
        return (self._rowwise and id(p) in self._ids and bool(self._handles) and self.clip in ("none", "value")
                and not (self.stochastic_rounding and p.dtype == torch.bfloat16) and self._world == 1
                and not self._in_norm_pass)

    @torch.no_grad()
    def begin_rows(self, p: Tensor) -> None:
        """Open this step's row-part update of `p` (bookkeeping of one update: a later hook on `p` in the
        same step is refused as gradient accumulation)."""
        self._begin_update(self._ids[id(p)])
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        state["step"] += 1

    @torch.no_grad()
    def update_rows(self, p: Tensor, rows: Tensor, grad_rows: Tensor) -> None:
        """Update `rows` in place ([R, ...]: a view of rows of `p`, or a copy written back by the caller)
        with their whole gradient `grad_rows` [R, ...], after `begin_rows(p)`."""
        idx = self._ids[id(p)]
        chunks = Chunks(rows, grad_rows, self.chunk_bytes, clip=self.clip, max_norm=self.max_norm)
        self._update(rows, chunks, self.param_groups[self._group_of[idx]], self.state[p])

    _rowwise = False  # True when a row's update reads only that row's gradient and parameter (Lomo)

    @staticmethod
    def _init_state(p: Tensor, state: dict) -> None:
        """Create the state of a parameter's first update (subclasses add their tensors)."""
        state["step"] = 0

    def _update(self, p: Tensor, chunks: Chunks, group: dict, state: dict) -> None:
        raise NotImplementedError

    # ---- global-norm clipping: two passes ----------------------------------------------------------
    @contextlib.contextmanager
    def norm_pass(self) -> Iterator[None]:
        """First pass of clip='global': backward inside this block only measures the gradient norm.

        Nothing is updated; gradients are freed. On leaving the block the clip coefficient is fixed for
        this step; the next backward (the update pass) uses it, then `step()` ends the step. Running the
        norm pass again before the update pass replaces the norm (nothing was updated yet).
        """
        if self.clip != "global":
            raise ValueError(f"norm_pass() is for clip='global', this optimizer has clip={self.clip!r}")
        if self._in_norm_pass:
            raise RuntimeError("norm_pass() blocks cannot be nested")
        if self._n_updated:
            raise RuntimeError("this step already updated parameters; call opt.step() before the next norm pass")
        self._in_norm_pass, self._norms = True, {}
        try:
            yield
        except BaseException:
            self._norms = {}
            raise
        finally:
            self._in_norm_pass = False
        self._finish_norm_pass()

    def _finish_norm_pass(self) -> None:
        if not self._norms:
            raise RuntimeError("the norm pass saw no gradient of an owned parameter: call loss.backward() "
                               "inside `with opt.norm_pass():`")
        first = self._norms[min(self._norms)].device
        norms = [self._norms[i].to(first) for i in sorted(self._norms)]  # parameter order, as clip_grad_norm_
        total = torch.linalg.vector_norm(torch.stack(norms))
        self.last_grad_norm = total
        self._skip = not bool(torch.isfinite(total))
        self._clip_coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        self._coef_on = {}

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        """Backward with the right number of passes for `clip`: two for 'global', else one."""
        if self.clip == "global":
            with self.norm_pass():
                loss.backward(retain_graph=True)
        loss.backward(retain_graph=retain_graph)

    # ---- step ----------------------------------------------------------------------------------------
    def step(self, closure=None, **kwargs) -> None:
        """End the step. The updates already happened during backward; this does no math.

        Raises TypeError for a closure (closure-style optimization cannot be fused), RuntimeError when
        driven by an fp16 GradScaler, for a norm pass without its update pass, or when an owned
        parameter holds `.grad` (something, e.g. DDP, produced a gradient after our hook freed it); it
        closes the step before raising. A step() without a backward since the last one is an empty step.
        """
        if closure is not None:
            raise TypeError(f"{type(self).__name__}.step() takes no closure: updates happen inside backward")
        if "grad_scaler" in kwargs or "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            raise RuntimeError(_SCALER_MSG.format(cls=type(self).__name__))
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} to {type(self).__name__}.step()")
        if self._in_norm_pass:
            raise RuntimeError("step() called inside `with opt.norm_pass():`; call it after the update pass")
        problem = None
        if self.clip == "global" and self._clip_coef is not None and self._n_updated != len(self._norms):
            problem = (f"the norm pass saw {len(self._norms)} gradients but the update pass updated "
                       f"{self._n_updated}: run loss.backward() once after the norm pass (or use "
                       "opt.backward(loss)). The step was closed anyway; the next one starts clean.")
        for i, p in enumerate(self._params):
            if p.grad is not None:
                problem = (
                    f"owned parameter #{i} {tuple(p.shape)} holds .grad after backward: something produced a "
                    "gradient after the fused update freed it (DistributedDataParallel / FSDP, a manual "
                    "p.grad, or hooks removed). Do not wrap the model in DDP/FSDP: Lomo/AdaLomo average "
                    "gradients across ranks themselves"
                )
                break
        self.skipped_steps += int(self._skip and self._n_updated > 0)
        self._updated = bytearray(len(self._params))
        self._n_updated, self._clip_coef, self._coef_on, self._skip = 0, None, {}, False
        self._norms = {}
        self.steps_done += 1
        if problem is not None:
            raise RuntimeError(problem)

    # ---- state -------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Like Optimizer.load_state_dict, but state tensors stay fp32 (torch would cast them to the
        parameter dtype, losing AdaLomo's second moments of bf16 parameters) and are copied."""
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            saved = state_dict["state"].get(i)
            if saved is not None:
                self.state[p] = {k: _restore(v, p) for k, v in saved.items()}


def _restore(value, p: Tensor):
    if not torch.is_tensor(value):
        return value
    dtype = torch.float32 if value.is_floating_point() and value.dtype != torch.float64 else value.dtype
    return value.detach().to(device=p.device, dtype=dtype, copy=True)

