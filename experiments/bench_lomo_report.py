"""The Markdown of the Lomo / AdaLomo benchmark (`experiments/bench_lomo.py`): the tables of both parts,
the verdicts against the targets, the notes that explain a missed target from the measured breakdown, and
the section of BENCHMARKS.md it replaces with `--write`.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers

from experiments.bench_lomo_memory import CATEGORIES, METHODS
from experiments.benchmarks_md import replace_section

ROOT = Path(__file__).resolve().parent.parent  # the repository root: BENCHMARKS.md
SECTION = "## Lomo / AdaLomo: memory and hook overhead (experiments/bench_lomo.py)"
TARGET_PEAK, TARGET_HOOK = 0.4, 1.3


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
