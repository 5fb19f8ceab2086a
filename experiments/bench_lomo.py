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
plain `loss.backward()` vs Lomo's fused backward (hooks + SGD update) vs `OriginalLomo`, the
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

Files: this one (options, presets, the run and its JSON), `bench_lomo_memory.py` (part 1: the methods,
one step of each, `FreeGrads`, the peak tracker), `bench_lomo_hooks.py` (part 2: `OriginalLomo`, the
hook timing), `bench_lomo_report.py` (the Markdown, the notes, the BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.bench_lomo_hooks import OriginalLomo, bench_hooks, hook_config  # noqa: E402
from experiments.bench_lomo_memory import MIB, FreeGrads, bench_dtype, build, smollm_config  # noqa: E402
from experiments.bench_lomo_report import notes, report, write_benchmarks  # noqa: E402

__all__ = ["main", "OriginalLomo", "FreeGrads"]

# layers of the SmolLM2-size model; (batch, seq) per dtype; timed samples per method; hook model layers, ...
FULL = {"layers": 30, "fp32": (2, 128), "bf16": (1, 8), "samples": 3, "bf16_samples": 3, "hook_layers": 78,
        "hook_bt": (1, 128), "hook_samples": 10}
QUICK = {"layers": 2, "fp32": (1, 64), "bf16": (1, 4), "samples": 1, "bf16_samples": 1, "hook_layers": 26,
         "hook_bt": (1, 64), "hook_samples": 2}


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
