"""Section e of the GPU validation kit: step time of MEFT (frozen backbone; staged, and zero-copy as
meft_zc) against LoRA r=16 (peft) on the SmolLM2-135M and TinyLlama-1.1B shapes, random weights, and one
larger-batch point where the step is compute-bound; warm-up and timed steps with the garbage collector
frozen and disabled, each step synchronised; median.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import time
import traceback

import torch

from experiments.gpu_check_sections.common import TINY, batch, llama, release, sync, wrap

SHAPES = {"smollm2_135m": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, tie=True),
          "tinyllama_1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000, tie=False)}
ROWS = {"smollm2_135m": 16384, "tinyllama_1.1b": 8192}  # adapter_rows per layer (--quick: 4096)
LARGE = ("tinyllama_1.1b", 8, 1024)  # the larger-batch point: shape, batch, tokens per sequence


def _run_method(method, dev, shape, data, rows, warm, timed, deadline) -> dict:
    model = llama(dev, torch.bfloat16 if dev == "cuda" else torch.float32, **shape)
    t0 = time.perf_counter()
    if method in ("meft", "meft_zc"):
        rt, _ = wrap(model, adapter_rows=rows, expert_size=16, experts_per_token=4, max_active_rows=1024,
                     backbone="frozen", fetch_mode="zero_copy" if method == "meft_zc" else "staged")
        opt = rt.optimizer
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
                               autocast_adapter_dtype=False)  # adapters in the model's dtype, like MEFT's rows
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    res = {"setup_s": round(time.perf_counter() - t0, 2), "adapter_rows": rows if method != "lora16" else None}
    model.train()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    gc.collect()
    gc.freeze()  # no collector pauses inside timed steps
    gc.disable()
    try:
        for i in range(warm + timed):
            if times and time.monotonic() > deadline:
                break
            sync(dev)
            t0 = time.perf_counter()
            model(**data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            if i >= warm:
                times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
        gc.unfreeze()
    res.update(median_ms=round(1e3 * statistics.median(times), 2), min_ms=round(1e3 * min(times), 2),
               steps=len(times))
    if dev == "cuda":
        res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    release(model)
    return res


def sec_step_time(a, dev, deadline):
    cpu = dev != "cuda"
    shapes = {k: dict(TINY, hidden=64 * (i + 1), inter=128 * (i + 1)) for i, k in enumerate(SHAPES)} if cpu \
        else SHAPES
    b, t = (2, 32) if cpu else ((8, 128) if a.quick else (8, 256))
    large, lb, lt = LARGE if not cpu else (LARGE[0], 2, 128)
    points = {s: (s, b, t) for s in shapes} | {f"{large}_{lb}x{lt}": (large, lb, lt)}
    warm, timed = (1, 2) if cpu else (5, 20)
    lora_skip = None if importlib.util.find_spec("peft") else "peft is not importable"
    runs = [(p, m) for p in points for m in ("meft", "meft_zc", "lora16")]
    out = {"batch": [b, t], "points": {p: [pb, pt] for p, (_, pb, pt) in points.items()}, "warmup": warm,
           "timed": timed, "gc": "frozen and disabled while stepping", "dtype": "float32" if cpu else "bfloat16"}
    for i, (p, m) in enumerate(runs):
        s, pb, pt = points[p]
        left = deadline - time.monotonic()
        if m == "lora16" and lora_skip or left <= 0:
            out.setdefault(p, {})[m] = {"skipped": lora_skip if m == "lora16" and lora_skip else "time budget"}
            continue
        rows = 512 if cpu else (4096 if a.quick else ROWS[s])
        try:
            res = _run_method(m, dev, shapes[s], batch(dev, shapes[s]["vocab"], pb, pt), rows, warm, timed,
                              time.monotonic() + left / (len(runs) - i))
        except Exception:  # noqa: BLE001 - recorded; the other runs go on
            res = {"error": traceback.format_exc()[-1500:]}
        release()  # what the run left in reference cycles (host stores, pinned blocks, device memory)
        out.setdefault(p, {})[m] = res
    parts = []
    for s in points:
        mm, zm, lm = (out[s][m].get("median_ms") for m in ("meft", "meft_zc", "lora16"))
        out[s]["meft_vs_lora16"] = round(mm / lm, 2) if mm and lm else None
        out[s]["meft_zc_vs_lora16"] = round(zm / lm, 2) if zm and lm else None
        parts.append(f"{s}: meft {mm} ms, meft_zc {zm} ms, lora16 {lm} ms, ratios {out[s]['meft_vs_lora16']} / "
                     f"{out[s]['meft_zc_vs_lora16']}")
    out["passed"] = all("error" not in out[p][m] for p, m in runs)
    out["summary"] = "; ".join(parts)
    return out
