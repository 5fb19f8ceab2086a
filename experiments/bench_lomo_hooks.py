"""Part 2 of the Lomo / AdaLomo benchmark (`experiments/bench_lomo.py`): the cost of Lomo's fused hooks on
a deep, narrow Llama (many parameter tensors). Plain `loss.backward()` against meft.Lomo's fused backward
and against `OriginalLomo`, the original LOMO hook scheme kept here as the reference, with a one-step
check that the three update the weights alike.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import transformers
from tqdm import tqdm

import meft
from experiments.bench_lomo_memory import batch, build


def hook_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
                                    num_attention_heads=3, num_key_value_heads=1, vocab_size=49152,
                                    tie_word_embeddings=True)


class OriginalLomo:
    """Reference only: the original LOMO's hook scheme (OpenLMLab/LOMO `LOMO.fuse_update`), SGD, no clipping.

    A tensor hook on every trainable parameter; each hook call walks ALL named parameters and updates (and
    frees) every one whose `.grad` has been accumulated, so n hooks x n parameters per backward. The hook of
    a parameter fires before its own gradient is accumulated, hence the extra call after backward.
    """

    def __init__(self, model, lr: float):
        self.model, self.lr = model, lr
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.register_hook(self.grad_func)

    def grad_func(self, x):
        with torch.no_grad():
            for _, p in self.model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    grad_fp32 = p.grad.to(torch.float32)
                    p.grad = None
                    p_fp32 = p.data.to(torch.float32)
                    p_fp32.add_(grad_fp32, alpha=-self.lr)
                    p.data.copy_(p_fp32)
        return x

    def fused_backward(self, loss) -> None:
        loss.backward()
        self.grad_func(0)  # the last parameter's gradient was accumulated after its hook


def bench_hooks(cfg, bt, samples: int) -> dict:
    base, ids = build(cfg, torch.float32), batch(cfg, bt)
    n_tensors = sum(1 for _ in base.parameters())
    models = {k: copy.deepcopy(base) for k in ("plain", "lomo", "original")}
    lr = 1e-2  # large enough that one step moves the weights: the check below compares the three
    sgd = torch.optim.SGD(models["plain"].parameters(), lr=lr)
    lomo = meft.Lomo(models["lomo"], lr=lr)
    orig = OriginalLomo(models["original"], lr=lr)
    times, names, diffs = {k: [] for k in (*models, "sgd_step")}, tuple(models), {}
    backward = {"plain": lambda loss: loss.backward(), "lomo": lambda loss: (lomo.backward(loss), lomo.step()),
                "original": orig.fused_backward}
    for r in tqdm(range(samples + 1), desc="hook overhead rounds", file=sys.stderr):
        for name in names[r % 3:] + names[:r % 3]:
            loss = models[name](input_ids=ids, labels=ids).loss
            t0 = time.perf_counter()
            backward[name](loss)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            if name == "plain":  # the update Lomo fuses into backward, timed apart for context
                t1 = time.perf_counter()
                sgd.step()
                if r:
                    times["sgd_step"].append(time.perf_counter() - t1)
                sgd.zero_grad(set_to_none=True)
        if r == 0:  # one SGD step each from the same weights and batch: a correctness check
            with torch.no_grad():
                ref = dict(models["lomo"].named_parameters())
                for k in ("plain", "original"):
                    diffs[k] = max(float((p - ref[n]).abs().max()) for n, p in models[k].named_parameters())
                diffs["moved"] = max(float((p - ref[n]).abs().max()) for n, p in base.named_parameters())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "n_tensors": n_tensors,
            "n_params": sum(p.numel() for p in base.parameters()), "batch": list(bt),
            "plain_bwd_s": med["plain"], "sgd_step_s": med["sgd_step"], "lomo_bwd_s": med["lomo"],
            "original_bwd_s": med["original"], "samples": {k: v for k, v in times.items()},
            "max_abs_diff_after_one_step_vs_lomo": diffs,
            "lomo_vs_plain_plus_sgd_step": med["lomo"] / (med["plain"] + med["sgd_step"]),
            "original_vs_plain": med["original"] / med["plain"], "hook_overhead_ratio": med["lomo"] / med["plain"]}
