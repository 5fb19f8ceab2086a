"""Lomo / AdaLomo: peak memory and step time against AdamW and SGD, and the cost of the fused hooks.

Part 1: a model of SmolLM2-135M's size from its config (hidden 576, intermediate 1536, 30
layers, 9 heads, 3 kv heads, vocab 49152, tied embeddings; random weights, seed 0, no hub), fp32 and bf16.
For one step of torch.optim.AdamW, torch.optim.SGD, meft.Lomo and meft.AdaLomo: the peak of parameters +
gradients + optimizer state + activations, measured on the real tensors by torch's MemTracker (model,
optimizer and batch tracked; steady state: after the warm-up and timed steps), broken down by category,
with where it happens (forward / backward / optimizer step, the op, and the autograd node running it or
the innermost module); the same peak for `FreeGrads`, a backward that frees every gradient in its hook and
updates nothing: the floor of any optimizer fused into backward on this workload (parameters +
activations + autograd's own temporaries). MemTracker counts the tensors ops return, not allocations
inside one op's kernel (on CPU, vector_norm(bf16, dtype=fp32) casts a whole copy first); the profiler
checks those for Lomo / AdaLomo in tests/meft/lomo/test_chunked.py. And
the step time (zero_grad + forward + backward + step; Lomo/AdaLomo: forward + `opt.backward(loss)` +
`opt.step()`), median (and best) of samples interleaved with the order rotating per round. bf16 uses a
shorter batch: this CPU has no native bf16, its bf16 GEMMs run at 0.1-3 GFLOP/s (a 2 x 128-token step
took over a minute); the bf16 peak falls at the end of backward, not on activations. Torch runs 1 thread
(`--threads`): on a shared 2-core box, 2-thread OpenMP regions stall at their barriers whenever another
process holds a core (the same backward measured 3-37 s, vs 0.5 s with 1 thread).

Part 2: hook overhead on a deeper, narrower Llama (78 layers, hidden 192: 704 parameter tensors, fp32):
plain `loss.backward()` vs Lomo's fused backward (hooks + SGD update) vs `OriginalLomo` below, the
original LOMO hook scheme as a reference (each hook scans all parameters: O(n^2) per backward).

Loss: every method runs twice, once on the plain loss `model(input_ids, labels=ids).loss` ("hf" rows:
adamw, sgd, lomo, adalomo, floor) and once on `meft.lomo.head.lm_loss(model, ids, opt=opt)` ("+head"
rows), the same loss with the LM head + cross-entropy in vocabulary chunks (no [N, V] logits kept) and the
tied embedding/head weight's gradient in one buffer (AdamW, AdaLomo) or, for Lomo, none (its rows are
updated inside the head's backward). Each row's "/ AdamW" is against AdamW on the same loss; "/ AdamW hf"
against AdamW on the plain loss.

    python experiments/bench_lomo.py [--quick] [--json] [--write]

Targets: Lomo and AdaLomo peak <= 0.4x AdamW's (headline: the +head rows against AdamW+head, the same
loss, the worse of fp32 and bf16; the plain-loss ratios are printed too); Lomo backward / plain backward
<= 1.3x. `--json` prints a JSON object as the last stdout line, ending with `lomo_peak_ratio_vs_adamw`,
`adalomo_peak_ratio_vs_adamw`, `hook_overhead_ratio`. `--write`
replaces (or appends) this benchmark's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from tqdm import tqdm  # noqa: E402

import meft  # noqa: E402
from experiments.benchmarks_md import replace_section  # noqa: E402
from meft.lomo import lm_loss  # noqa: E402

__all__ = ["main", "OriginalLomo", "FreeGrads"]

SECTION = "## Lomo / AdaLomo: memory and hook overhead (experiments/bench_lomo.py)"
METHODS = ("adamw", "sgd", "lomo", "adalomo", "adamw+head", "lomo+head", "adalomo+head")  # +head: lm_loss
LR = {"adamw": 1e-5, "sgd": 1e-4, "lomo": 1e-4, "adalomo": 1e-5}
FLOORS = ("floor", "floor+head")  # FreeGrads on the plain loss / on lm_loss
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp")
TARGET_PEAK, TARGET_HOOK = 0.4, 1.3
MIB = 2**20
# layers of the SmolLM2-size model; (batch, seq) per dtype; timed samples per method; hook model layers, ...
FULL = {"layers": 30, "fp32": (2, 128), "bf16": (1, 8), "samples": 3, "bf16_samples": 3, "hook_layers": 78,
        "hook_bt": (1, 128), "hook_samples": 10}
QUICK = {"layers": 2, "fp32": (1, 64), "bf16": (1, 4), "samples": 1, "bf16_samples": 1, "hook_layers": 26,
         "hook_bt": (1, 64), "hook_samples": 2}


def smollm_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                    tie_word_embeddings=True)


def hook_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
                                    num_attention_heads=3, num_key_value_heads=1, vocab_size=49152,
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


def verdict(value: float, target: float) -> str:
    return f"**{value:.3f}** (target <= {target}): **{'HIT' if value <= target else 'MISS'}**"


def report(res: dict) -> str:
    cfg, h = res["config"], res["hook"]
    cols = ("peak MiB", "/ AdamW", "/ AdamW hf", "params", "grads", "opt state", "activations", "temp", "step s",
            "best s",
            "peak at")
    lines = [f"Model: SmolLM2-135M config, {cfg['layers']} layers ({res['n_params'] / 1e6:.1f} M parameters, "
             f"{res['n_tensors']} tensors), random weights, {cfg['attn']} attention, {cfg['threads']} torch "
             f"thread(s). Tokens per step: fp32 batch {cfg['fp32'][0]} x seq {cfg['fp32'][1]}, bf16 batch "
             f"{cfg['bf16'][0]} x seq {cfg['bf16'][1]}; 1 warm-up + {cfg['samples']} (bf16: {cfg['bf16_samples']}) "
             "interleaved timed steps per method (median, best), then one MemTracker step. MiB at the peak; "
             "`floor`: a backward that frees every gradient in its hook and updates nothing (the least any "
             "optimizer fused into backward can peak at on this workload; `floor+head` holds the tied weight's "
             "one gradient buffer, which Lomo+head does not, so Lomo+head may peak below it). `+head`: the loss is "
             "`meft.lomo.head.lm_loss` (LM head + cross-entropy in vocabulary chunks; tied weight's gradient in one "
             "buffer, or for Lomo none: its rows are updated inside the head's backward); \"/ AdamW\" is against "
             "AdamW on the same loss, \"/ AdamW hf\" against AdamW on the plain `model(..., labels=...).loss`:", "",
             "| dtype | method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for dt in ("fp32", "bf16"):
        for name in (*METHODS[:4], "floor", *METHODS[4:], "floor+head"):
            r, b = res[dt][name], res[dt][name]["breakdown_mib"]
            times = [f"{r[k]:.2f}" if k in r else "-" for k in ("step_s", "step_s_best")]
            cells = [f"{r['peak_mib']:.0f}", f"{r['peak_vs_adamw']:.3f}", f"{r['peak_vs_adamw_hf']:.3f}",
                     *(f"{b[c]:.0f}" for c in CATEGORIES),
                     *times, r["peak_at"]]
            lines.append(f"| {dt} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Hook overhead: Llama with {h['layers']} layers, hidden {h['hidden']} "
              f"({h['n_params'] / 1e6:.1f} M parameters, {h['n_tensors']} tensors), fp32, batch {h['batch'][0]} x "
              f"seq {h['batch'][1]}, 1 warm-up + {cfg['hook_samples']} interleaved rounds, medians:", "",
              "| backward | s (median) | / plain | best s | best / plain best |", "|---|---|---|---|---|"]
    plain, sm, best = h["plain_bwd_s"], h["samples"], {k: min(v) for k, v in h["samples"].items()}
    plain_sgd = min(a + b for a, b in zip(sm["plain"], sm["sgd_step"]))
    rows = (("plain `loss.backward()`", plain, best["plain"]),
            ("plain + `SGD.step()` (context)", plain + h["sgd_step_s"], plain_sgd),
            ("meft.Lomo fused (hooks + update)", h["lomo_bwd_s"], best["lomo"]),
            ("original LOMO scheme (O(n^2) scan, reference)", h["original_bwd_s"], best["original"]))
    for label, v, bst in rows:
        lines.append(f"| {label} | {v:.3f} | {v / plain:.2f} | {bst:.3f} | {bst / best['plain']:.2f} |")
    lines.append("")
    for m, label in (("lomo", "Lomo"), ("adalomo", "AdaLomo")):
        worse = verdict(res[f"{m}_peak_ratio_vs_adamw"], TARGET_PEAK)
        hd = f"{m}+head"
        lines.append(f"- {label}+head peak / AdamW+head peak (same loss): fp32 {res['fp32'][hd]['peak_vs_adamw']:.3f}, "
                     f"bf16 {res['bf16'][hd]['peak_vs_adamw']:.3f}; worse {worse}; against AdamW on the plain "
                     f"loss: fp32 {res['fp32'][hd]['peak_vs_adamw_hf']:.3f}, "
                     f"bf16 {res['bf16'][hd]['peak_vs_adamw_hf']:.3f}; "
                     f"{label} on the plain loss: fp32 {res['fp32'][m]['peak_vs_adamw']:.3f}, bf16 "
                     f"{res['bf16'][m]['peak_vs_adamw']:.3f}")
    d = h["max_abs_diff_after_one_step_vs_lomo"]
    lines += [f"- Lomo backward / plain backward {verdict(res['hook_overhead_ratio'], TARGET_HOOK)}; Lomo / "
              f"(plain + SGD.step()) = {h['lomo_vs_plain_plus_sgd_step']:.2f}; original scheme / plain = "
              f"{h['original_vs_plain']:.2f}",
              f"- check: after one step from the same weights, max |w - w_Lomo| = {d['plain']:.1e} (SGD), "
              f"{d['original']:.1e} (original scheme); the step moved the weights by up to {d['moved']:.1e}"]
    return "\n".join(lines + [f"- note: {n}" for n in res["notes"]])


def notes(res: dict) -> list[str]:
    out, big = [], res["largest_fp32_mib"]
    for dt in ("fp32", "bf16"):
        floor = res[dt]["floor+head"]
        for name in ("lomo+head", "adalomo+head"):
            r, b = res[dt][name], res[dt][name]["breakdown_mib"]
            if r["peak_vs_adamw"] <= TARGET_PEAK:
                continue
            fb = floor["breakdown_mib"]
            line = (f"{dt} {name}: peak {r['peak_mib']:.0f} MiB = parameters {b['Parameter']:.0f} + activations "
                    f"{b['Activation']:.0f} + temporaries {b['Temp']:.0f} + gradients/state "
                    f"{b['Gradient'] + b['Optstate']:.0f}, at {r['peak_at']}; the floor (no update, gradients "
                    f"freed) peaks at {floor['peak_mib']:.0f} MiB = {floor['peak_vs_adamw']:.3f}x AdamW's, at "
                    f"{floor['peak_at']}, so the optimizer adds {r['peak_mib'] - floor['peak_mib']:.0f} MiB")
            if floor["peak_vs_adamw"] > TARGET_PEAK:
                line += (f". The target is out of reach at this batch for any update fused into backward: the "
                         f"floor's peak is parameters {fb['Parameter']:.0f} + activations {fb['Activation']:.0f} + "
                         f"autograd's temporaries {fb['Temp']:.0f}")
                # this model's two floor peaks, identified by listing the live storages at the peak
                emb = big * (1.0 if dt == "fp32" else 0.5)  # MiB of the tied embedding's gradient in this dtype
                if floor["peak_at"].endswith("MmBackward0"):
                    line += (f": the first matmul of backward, where autograd makes the lm_head's weight gradient "
                             f"({emb:.0f} MiB, held until the tied embedding's part is added at the end of "
                             "backward) from the logits' gradient, with every activation still alive")
                elif floor["peak_at"].endswith("EmbeddingBackward0"):
                    line += (f": the end of backward, where autograd sums the tied embedding's gradient out of "
                             f"place: the lm_head's part, the embedding's part and their sum, {emb:.0f} MiB each")
            out.append(line)
    h = res["hook"]
    if h["hook_overhead_ratio"] > TARGET_HOOK:
        out.append(f"hook overhead {h['hook_overhead_ratio']:.2f}x: Lomo's backward also performs the update, "
                   f"which the plain backward does not; against plain backward + SGD.step() it is "
                   f"{h['lomo_vs_plain_plus_sgd_step']:.2f}x")
    if res["config"]["loadavg"] > res["config"]["cores"]:
        out.append(f"shared machine (load average {res['config']['loadavg']:.1f} on {res['config']['cores']} "
                   "cores): absolute times are inflated, ratios of interleaved medians less so")
    return out


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.machine())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at report time), "
            f"{ram:.0f} GiB RAM, {platform.system()} {platform.release()}")


def write_benchmarks(text: str, argv: list[str]) -> None:
    path = ROOT / "BENCHMARKS.md"
    body = (f"{SECTION}\n\nCommand: `python experiments/bench_lomo.py {' '.join(argv)}`  \n"
            f"Date: {datetime.datetime.now().strftime('%Y-%m-%dT%H:%M')}  \nMachine: {machine()}  \n"
            f"Versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}\n\n{text}\n")
    replace_section(SECTION, body, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 26-layer hook model, fewer samples")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last stdout line")
    ap.add_argument("--write", action="store_true", help="also write its section of BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    cfg = smollm_config(preset["layers"])
    t_start = time.perf_counter()
    base = build(cfg, torch.float32)  # every method and dtype starts from these weights
    sizes = [p.numel() for p in base.parameters()]
    res = {"config": {**preset, "attn": base.config._attn_implementation, "threads": torch.get_num_threads(),
                      "cores": os.cpu_count()},
           "n_params": sum(sizes), "n_tensors": len(sizes), "largest_fp32_mib": max(sizes) * 4 / MIB}
    res["fp32"] = bench_dtype(base, torch.float32, preset["fp32"], preset["samples"])
    res["bf16"] = bench_dtype(base, torch.bfloat16, preset["bf16"], preset["bf16_samples"])
    del base
    res["hook"] = bench_hooks(hook_config(preset["hook_layers"]), preset["hook_bt"], preset["hook_samples"])
    res["config"]["loadavg"] = os.getloadavg()[0]
    res["config"]["wall_s"] = time.perf_counter() - t_start
    for m in ("lomo", "adalomo"):  # plain-loss rows (the earlier headline), then the headline: +head rows
        res[f"{m}_hf_loss_peak_ratio_vs_adamw"] = max(res[dt][m]["peak_vs_adamw"] for dt in ("fp32", "bf16"))
        res[f"{m}_head_peak_ratio_vs_adamw_hf_loss"] = max(res[dt][f"{m}+head"]["peak_vs_adamw_hf"]
                                                           for dt in ("fp32", "bf16"))
    res["lomo_peak_ratio_vs_adamw"] = max(res[dt]["lomo+head"]["peak_vs_adamw"] for dt in ("fp32", "bf16"))
    res["adalomo_peak_ratio_vs_adamw"] = max(res[dt]["adalomo+head"]["peak_vs_adamw"] for dt in ("fp32", "bf16"))
    res["hook_overhead_ratio"] = res["hook"]["hook_overhead_ratio"]
    res["notes"] = notes(res)
    text = report(res)
    print(text)
    print(f"(wall time {res['config']['wall_s']:.0f} s)")
    if args.write:
        write_benchmarks(text, sys.argv[1:] if argv is None else argv)
        print(f"wrote section to {ROOT / 'BENCHMARKS.md'}")
    if args.json:
        keys = ("lomo_peak_ratio_vs_adamw", "adalomo_peak_ratio_vs_adamw", "hook_overhead_ratio")
        ordered = {k: v for k, v in res.items() if k not in keys} | {k: res[k] for k in keys}
        print(json.dumps(ordered))
    return res


if __name__ == "__main__":
    main()
