"""MEFT (staged and zero-copy fetch) vs LoRA r=16 at 7B shape on a GPU capped at 24 GiB: step time, GPU busy
share, kernel launches, memory vs `meft plan`, host traffic.

Run it on a lent GPU as one call (about 4-6 minutes: two shapes x three methods, 4 of 32 layers each):

    python experiments/bench_7b.py --layers 4 --json

Owns the question meft exists for: does a 7B-class fine-tune fit one 24 GiB GPU, and how close to LoRA's
speed is it? Shapes are Llama-2-7B and Mistral-7B from meft/configs/*.json, built from their configs with
seeded random bf16 weights on the device (nothing downloaded); `--layers K` keeps the first K decoder layers
(embeddings and head whole) so one run stays short; GPU memory is capped at 24 GiB with
`torch.cuda.set_per_process_memory_fraction`. Every method: gradient checkpointing (non-reentrant),
4 x 512 real tokens, backbone frozen, 5 warm-up and 20 timed steps with the garbage collector frozen and
disabled, each step synchronised and timed alone (median). LoRA r=16 is peft on every linear layer with
bf16 adapter weights (`autocast_adapter_dtype=False`), torch AdamW. MEFT: 16,384 rows per layer, experts of
64 rows, 4 experts per token, a budget of 1,024 active rows per layer.

On a CPU (no CUDA) it runs a tiny shape of each config (width 64, 2 layers unless --layers, 2 x 32 tokens,
fp32, 512 rows per layer): a smoke run of the same code; the GPU keys are null there.

`--json` prints one JSON object as the last line: {"device", "layers", "batch", ..., "shapes": {name: {...}}}
with, per shape:
  tokens_per_s         per method: real tokens / median step seconds
  meft_vs_lora16       per MEFT method: its median step / LoRA r=16's (target: <= 1.1)
  gpu_busy_fraction    per method: union of kernel intervals / span from first kernel start to last kernel end,
                       over 3 steps under torch.profiler (null on CPU)
  peak_gpu_gib         per method: torch.cuda.max_memory_allocated over warm-up and timed steps (null on CPU)
  plan_gpu_gib, plan_host_gib   per MEFT method: `meft.plan.plan` for the same model slice, batch and config
  host_ram_gib         per MEFT method: {"rss_growth": process RSS after wrap minus before, "stores": the row
                       stores' bytes (model.meft.summary())}
  device_flags         per MEFT method: the staged fetch's rows are awaited by the device on flags (no lockstep)
  worker_waits         per MEFT method: times the compute thread waited for the host worker (0 with flags)
  exposed_fetch_ms     per MEFT method and timed step: time the compute thread was blocked on the scheduler
                       (rows, a slot), from the runtime's TrafficMeter report ("overlap.blocked_ms")
  cpu_update_ms        per MEFT method and timed step: host row-update time from the same report
  launches_per_layer   per MEFT method: what the adapter adds to one training forward per adapted layer --
                       CUDA kernels from torch.profiler on a GPU, aten ops from a TorchDispatchMode on a CPU
                       (experiments/count_adapter_ops.py); wrapped forward minus the plain model's forward
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.count_adapter_ops import count_ops  # noqa: E402

__all__ = ["main", "run_shape"]

GiB = 2**30
CONFIGS = {"llama-2-7b": ROOT / "meft/configs/llama-2-7b.json", "mistral-7b": ROOT / "meft/configs/mistral-7b.json"}
METHODS = ("meft", "meft_zc", "lora16")
GPU_CAP = 24 * GiB
MEFT_GPU = dict(adapter_rows=16384, expert_size=64, experts_per_token=4, max_active_rows=1024)
MEFT_CPU = dict(adapter_rows=512, expert_size=16, experts_per_token=4, max_active_rows=128)
TINY = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, vocab_size=512)


def config_dict(name: str, layers: int, tiny: bool) -> dict:
    """The shipped config of `name`, cut to `layers` decoder layers (and shrunk to TINY on a CPU)."""
    data = {k: v for k, v in json.loads(CONFIGS[name].read_text()).items() if not k.startswith("_")}
    data.update(num_hidden_layers=layers, use_cache=False)
    if tiny:
        gqa = data["num_key_value_heads"] < data["num_attention_heads"]
        data.update(TINY, num_key_value_heads=2 if gqa else TINY["num_attention_heads"],
                    max_position_embeddings=256)
        data.pop("sliding_window", None)
    return data


def build(data: dict, dev: str, dtype):
    """The HF model of this config with seeded random weights, built straight on `dev` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from meft.pretrained import enable_checkpointing

    cfg = AutoConfig.for_model(**data)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    enable_checkpointing(model)
    return model.train()


def rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def meft_config(method: str, dev: str, compile_router: bool = False):
    import meft

    return meft.MeftConfig(**(MEFT_GPU if dev == "cuda" else MEFT_CPU), backbone="frozen",
                           fetch_mode="zero_copy" if method == "meft_zc" else "staged", compile_router=compile_router)


def launches(model, data, dev) -> tuple[int, object]:
    """(kernels or aten ops of one training forward, its output). On CUDA: kernels in torch.profiler."""
    if dev != "cuda":
        ops, out = count_ops(lambda: model(**data))
        return sum(ops.values()), out
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = model(**data)
        sync(dev)
    return len(kernels(prof)), out


def kernels(prof) -> list:
    """(start, end) us of the compute kernels a torch.profiler run recorded (copies and memsets left out)."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            out.append((e.time_range.start, e.time_range.end))
    return out


def busy_fraction(intervals: list) -> float | None:
    if not intervals:
        return None
    intervals.sort()
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / (max(e for _, e in intervals) - intervals[0][0])


def _meter_totals(model) -> tuple[float, float]:
    """(blocked ms, host row-update ms) recorded so far by the runtime's TrafficMeter."""
    rep = model.meft.meter.report()
    return rep["overlap"]["blocked_ms"], rep["cpu"].get("update", {}).get("ms", 0.0)


def run_method(method: str, data_cfg: dict, dev: str, dtype, batch: dict, args) -> dict:
    """Build, wrap, warm up, time, profile and release one method on one shape."""
    import meft

    model = build(data_cfg, dev, dtype)
    res = {}
    if method == "lora16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
                               autocast_adapter_dtype=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        model(**batch)  # one-time work (kernel selection, workspaces) stays out of the count below
        plain, _ = launches(model, batch, dev)
        gc.collect()
        r0 = rss()
        meft.wrap(model, meft_config(method, dev, args.compile_router))
        res["host_ram_gib"] = {"rss_growth": (rss() - r0) / GiB,
                               "stores": model.meft.summary()["host_resident"]["adapter_rows"]["bytes"] / GiB}
        opt = model.meft.optimizer
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup and method != "lora16":
                meter0 = _meter_totals(model)
            sync(dev)
            t0 = time.perf_counter()
            if i == args.warmup - 1 and method != "lora16":  # the last warm-up forward is counted
                wrapped, out = launches(model, batch, dev)
                res["launches_per_layer"] = (wrapped - plain) / len(model.meft.summary()["layers"])
            else:
                out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if method != "lora16":
            meter1 = _meter_totals(model)
            res["exposed_fetch_ms"] = (meter1[0] - meter0[0]) / args.steps
            res["cpu_update_ms"] = (meter1[1] - meter0[1]) / args.steps
            # staged: the device awaits the rows on flags (no lockstep) unless the engine has none
            res["device_flags"] = getattr(model.meft.scheduler, "flags", None) is not None
            res["worker_waits"] = model.meft.meter.report()["overlap"]["worker_waits"]
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB if dev == "cuda" else None
        res["gpu_busy_fraction"] = profile_busy(model, opt, batch) if dev == "cuda" else None
    finally:
        gc.enable()
        gc.unfreeze()
    med = statistics.median(times)
    res.update(step_ms=1e3 * med, step_ms_min=1e3 * min(times), steps=len(times),
               tokens_per_s=int(batch["attention_mask"].sum()) / med)
    if hasattr(model, "meft"):
        meft.unwrap(model)
    del model, opt
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


def profile_busy(model, opt, batch, steps: int = 3) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync("cuda")
    return busy_fraction(kernels(prof))


def plan_for(data_cfg: dict, method: str, dev: str, batch_shape) -> dict:
    """`meft plan` of the same slice, batch and MeftConfig: {"gpu_gib", "host_gib"}."""
    from meft.plan import PlanOptions, plan

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(data_cfg))
        opts = PlanOptions(model=str(path), gpu_mem="24GiB", seq=batch_shape[1], batch=batch_shape[0],
                           dtype="bfloat16" if dev == "cuda" else "float32", gradient_checkpointing=True,
                           search=False)
        r = plan(opts, meft_config(method, dev))
    return {"gpu_gib": r["gpu_total"] / GiB, "host_gib": r["host_ram"]["total"] / GiB}


def run_shape(name: str, dev: str, args) -> dict:
    cuda = dev == "cuda"
    data_cfg = config_dict(name, args.layers, tiny=not cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    b, t = (4, 512) if cuda else (2, 32)
    ids = torch.randint(3, data_cfg["vocab_size"], (b, t), generator=torch.Generator().manual_seed(1)).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    per = {}
    meft_ms, errors = [m for m in METHODS if m != "lora16"], {}
    for m in METHODS:  # one method's failure is recorded and never hides the others
        t0 = time.monotonic()
        try:
            per[m] = run_method(m, data_cfg, dev, dtype, batch, args)
        except Exception:  # noqa: BLE001
            per[m], errors[m] = {}, traceback.format_exc()[-1500:]
            gc.collect()
            continue
        per[m]["seconds"] = time.monotonic() - t0
        print(f"{name} {m}: {per[m]['step_ms']:.1f} ms/step, {per[m]['tokens_per_s']:,.0f} tokens/s "
              f"({per[m]['seconds']:.0f} s)", file=sys.stderr)
    plans = {}
    for m in meft_ms:
        try:
            plans[m] = plan_for(data_cfg, m, dev, (b, t))
        except Exception:  # noqa: BLE001
            plans[m], errors[f"plan {m}"] = {}, traceback.format_exc()[-1500:]
    pick = lambda key, ms=METHODS: {m: per[m].get(key) for m in ms}  # noqa: E731
    ratio = lambda m: per[m]["step_ms"] / per["lora16"]["step_ms"] if per[m] and per["lora16"] else None  # noqa: E731
    return {
        "layers": data_cfg["num_hidden_layers"], "hidden_size": data_cfg["hidden_size"], "batch": [b, t],
        "dtype": str(dtype).removeprefix("torch."), "step_ms": pick("step_ms"),
        "tokens_per_s": pick("tokens_per_s"),
        "meft_vs_lora16": {m: ratio(m) for m in meft_ms},
        "gpu_busy_fraction": pick("gpu_busy_fraction"), "peak_gpu_gib": pick("peak_gpu_gib"),
        "plan_gpu_gib": {m: plans[m].get("gpu_gib") for m in meft_ms},
        "plan_host_gib": {m: plans[m].get("host_gib") for m in meft_ms},
        "host_ram_gib": pick("host_ram_gib", meft_ms), "exposed_fetch_ms": pick("exposed_fetch_ms", meft_ms),
        "cpu_update_ms": pick("cpu_update_ms", meft_ms), "launches_per_layer": pick("launches_per_layer", meft_ms),
        "device_flags": pick("device_flags", meft_ms), "worker_waits": pick("worker_waits", meft_ms),
        "seconds": pick("seconds"), "errors": errors,
    }


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to keep (default: 4 on a GPU, 2 on "
                    "a CPU)")
    ap.add_argument("--shapes", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method")
    ap.add_argument("--compile-router", action="store_true", help="MEFT methods route through torch.compile "
                    "(MeftConfig.compile_router; the warm-up steps absorb the compile)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a.layers = a.layers or (4 if dev == "cuda" else 2)
    if dev == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_CAP / torch.cuda.get_device_properties(0).total_memory))
    t0 = time.monotonic()
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (tiny shapes)", "layers": a.layers,
           "warmup": a.warmup, "timed_steps": a.steps, "gc": "frozen and disabled while stepping",
           "compile_router": a.compile_router,
           "gpu_cap_gib": GPU_CAP / GiB if dev == "cuda" else None, "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "pid_cpus": len(os.sched_getaffinity(0)), "shapes": {}}
    for name in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        out["shapes"][name] = run_shape(name, dev, a)
    out["seconds"] = time.monotonic() - t0
    out = _rounded(out)
    for name, r in out["shapes"].items():
        for m, err in r["errors"].items():
            print(f"{name} {m} raised: {err.strip().splitlines()[-1]}", file=sys.stderr)
        print(f"{name} ({r['layers']} layers, d={r['hidden_size']}, {r['batch'][0]} x {r['batch'][1]}): tokens/s "
              + ", ".join(f"{m} {v or 0:,.0f}" for m, v in r["tokens_per_s"].items())
              + "; step / LoRA r=16: " + ", ".join(f"{m} {v or 0:.2f}" for m, v in r["meft_vs_lora16"].items()))
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(1 if any(r["errors"] for r in main()["shapes"].values()) else 0)
