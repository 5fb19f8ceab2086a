"""Part 1 of the Lomo / AdaLomo benchmark (`experiments/bench_lomo.py`): peak memory and step time of one
training step of torch.optim.AdamW, torch.optim.SGD, meft.Lomo and meft.AdaLomo on a model of SmolLM2-135M's
size, on the plain loss and on `meft.lomo.lm_loss` ("+head"), and the floor any optimizer fused into backward
can reach (`FreeGrads`). Owns the methods compared, how one step of each runs, and `PeakTracker`: torch's
MemTracker reduced to the global peak and where it happened.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import torch
import transformers
from torch.distributed._tools.mem_tracker import MemTracker
from tqdm import tqdm

import meft
from meft.lomo import lm_loss

METHODS = ("adamw", "sgd", "lomo", "adalomo", "adamw+head", "lomo+head", "adalomo+head")  # +head: lm_loss
LR = {"adamw": 1e-5, "sgd": 1e-4, "lomo": 1e-4, "adalomo": 1e-5}
FLOORS = ("floor", "floor+head")  # FreeGrads on the plain loss / on lm_loss
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp")
MIB = 2**20


def smollm_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                    tie_word_embeddings=True)


def build(cfg, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.train()
    return model


def batch(cfg, bt) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, bt, generator=torch.Generator().manual_seed(1))  # [B, T]


class FreeGrads(torch.optim.Optimizer):
    """Reference floor, memory only: frees each gradient in a post-accumulate hook, as Lomo does, and updates
    nothing. No optimizer that updates inside backward peaks lower on the same workload."""

    def __init__(self, model):
        super().__init__(model.parameters(), {})
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self._free)

    @staticmethod
    def _free(p) -> None:
        p.grad = None

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, closure=None) -> None:  # nothing to update: the hooks already freed the gradients
        return None


def make_opt(name: str, model):  # torch's defaults (CPU: for-loop implementations); SGD without momentum
    name = name.removesuffix("+head")
    if name in ("adamw", "sgd"):
        return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](model.parameters(), lr=LR[name])
    return {"lomo": meft.Lomo, "adalomo": meft.AdaLomo}[name](model, lr=LR[name])


def train_step(model, opt, ids, head: bool = False) -> None:
    if isinstance(opt, (meft.Lomo, meft.AdaLomo, FreeGrads)):
        opt.backward(lm_loss(model, ids, opt=opt) if head else model(input_ids=ids, labels=ids).loss)  # updates
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        (lm_loss(model, ids) if head else model(input_ids=ids, labels=ids).loss).backward()
        opt.step()


class PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: upstream also keeps per-module peaks, O(modules) work per op
    (a tracked step took 4-6x a plain one); the global peak is updated exactly as upstream does. Also notes
    where the peak happened (`peak_at()`): the phase, the op whose output made it, and the autograd node
    running it (backward; ModTracker's module names go stale there) or the innermost module (forward)."""

    _op = None
    _at = None  # (in optimizer step, in backward, op, autograd node name, modules running) at the peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = func
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)
                node = torch._C._current_autograd_node()
                self._at = (self._in_opt, self._mod_tracker.is_bw, self._op,
                            None if node is None else node.name(), set(self._mod_tracker.parents))

    def peak_at(self) -> str:
        """E.g. "backward: mm in MmBackward0", "forward: mm in model.layers.3.mlp.up_proj"."""
        if self._at is None:
            return "?"
        in_opt, is_bw, op, node, parents = self._at
        op = str(op).removeprefix("aten.").split(".")[0]
        if in_opt:
            return f"optimizer step: {op}"
        if is_bw:
            return f"backward: {op} in {(node or 'no node').removeprefix('torch::autograd::')}"
        inner = max(parents, key=lambda n: (n.count("."), len(n)))  # "Global" when no module runs
        return f"forward: {op} in {inner.split('.', 1)[1] if '.' in inner else inner}"


def peak_memory(model, opt, ids, head: bool = False) -> tuple[dict, str]:
    """MiB per MemTracker category at the peak of one step, and "Total"; where the peak happened."""
    opt.zero_grad(set_to_none=True)  # the previous step's gradients are not part of this one
    mt = PeakTracker() if hasattr(MemTracker, "_update_peak_stats") else MemTracker()
    mt.track_external(model, opt, ids)
    with warnings.catch_warnings():
        # MemTracker's own post-accumulate hook runs after Lomo's, which already freed p.grad
        warnings.filterwarnings("ignore", message="Expected a tensor")
        with mt:
            train_step(model, opt, ids, head)
    (snap,) = mt.get_tracker_snapshot("peak").values()
    where = mt.peak_at() if isinstance(mt, PeakTracker) else "?"
    return {str(getattr(k, "value", k)): v / MIB for k, v in snap.items()}, where


def bench_dtype(base, dtype, bt, samples: int) -> dict:
    ids, runs = batch(base.config, bt), {}
    for name in METHODS:
        model = copy.deepcopy(base).to(dtype)
        runs[name] = (model, make_opt(name, model))
    times = {name: [] for name in METHODS}
    label = str(dtype).removeprefix("torch.")
    with tqdm(total=(samples + 1) * len(METHODS), desc=f"{label} steps", file=sys.stderr) as bar:
        for r in range(samples + 1):  # round 0 is the warm-up
            order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
            for name in order:
                t0 = time.perf_counter()
                train_step(*runs[name], ids, name.endswith("+head"))
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
                bar.update()
    out = {}
    for name in tqdm(METHODS, desc=f"{label} peak memory", file=sys.stderr):
        mem, where = peak_memory(*runs[name], ids, name.endswith("+head"))
        out[name] = {"peak_mib": mem["Total"], "breakdown_mib": {c: mem.get(c, 0.0) for c in CATEGORIES},
                     "peak_at": where, "step_s": statistics.median(times[name]), "step_s_best": min(times[name]),
                     "step_s_samples": times[name]}
        del runs[name]  # one model at a time in memory from here on
    for name in FLOORS:
        model = copy.deepcopy(base).to(dtype)
        floor = FreeGrads(model)
        train_step(model, floor, ids, name.endswith("+head"))  # untracked first step, as every method had
        mem, where = peak_memory(model, floor, ids, name.endswith("+head"))
        out[name] = {"peak_mib": mem["Total"], "breakdown_mib": {c: mem.get(c, 0.0) for c in CATEGORIES},
                     "peak_at": where}
        del model, floor
    for name in (*METHODS, *FLOORS):  # against AdamW on the same loss, and on the plain loss
        same = "adamw+head" if name.endswith("+head") else "adamw"
        out[name]["peak_vs_adamw"] = out[name]["peak_mib"] / out[same]["peak_mib"]
        out[name]["peak_vs_adamw_hf"] = out[name]["peak_mib"] / out["adamw"]["peak_mib"]
    return out
