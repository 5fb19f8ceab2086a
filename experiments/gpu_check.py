"""GPU validation kit: the first thing to run on a machine with a CUDA device (docs/design.md "Devices").

  a cuda_tests  `pytest -q -m cuda tests/` in a subprocess: passed / failed / skipped, failing test names
  b twin        tiny Llama (LlamaConfig, seeded random fp32 weights) trained a few steps with
                MeftConfig(offload=True) (TransferScheduler) and offload=False (offload.ResidentScheduler):
                losses and adapter rows compared (max abs diff vs TOL), plain, grad_accum_steps=2 + clip
                'layer', staleness=1 + clip 'global', zero-copy (fetch_mode='zero_copy', alone and with
                staleness 1 + accumulation 2), each with a bf16 and an fp32 wire
  c syncs       forward, backward and optimizer step of the wrapped model under
                torch.cuda.set_sync_debug_mode("warn") (warnings counted, top call sites) and a
                TorchDispatchMode counting sync-class aten ops with their call sites (docs/design.md: none in
                the adapter path); staged and zero-copy fetch
  d pinned      pinned host tensors reachable from model.meft (stores, staging slots, ids buffers): exact
                bytes vs what the pinned allocator holds (power-of-two rounding), host RSS of wrap; staged
                and zero-copy (the mirrors pinned at their exact size)
  e step_time   MEFT (frozen backbone; staged, and zero-copy as meft_zc) vs LoRA r=16 (peft, bf16 adapter
                weights: autocast_adapter_dtype=False) on the SmolLM2-135M and TinyLlama-1.1B shapes (from
                configs, random weights, bf16, batch 8 x 256) and TinyLlama-1.1B at 8 x 1024 (a compute-bound
                point: a host-bound step barely grows with the batch): 5 warm-up and 20 timed steps with the
                garbage collector frozen and disabled, each step synchronised; median

    PYTHONPATH=. python3 experiments/gpu_check.py --out $OUT/gpu.json [--quick] [--only a,b,...]
    python3 experiments/gpu_check.py --device cpu --quick    # dry run without a GPU: b, c, d, e (tiny)

Each section reports {"ok", "error"} (one failure never hides the others), "passed" (its check held;
None where nothing is checked) and a one-line "summary"; a table is printed, and the last stdout line is
the JSON object. Exit status 1 only when a section raised. Without CUDA it prints so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import offload  # noqa: E402

# b: the twins round rows and grads to the wire dtype alike and differ only in the AdamW arithmetic (numba
# on the host vs torch on the device) and summation order: ~1 ulp of the fp32 rows per step. Adam turns an
# ulp of a near-zero gradient (or a flipped bf16 rounding of a row) into a visibly different step of that
# element, bounded by ~lr = 1e-2: measured on the CPU, 6 steps, max row diff 1e-4 (bf16 and fp32 wire).
# Stale or not-yet-landed rows would move whole rows by ~lr and the losses by ~1e-3.
TOL = {"loss": {"rtol": 1e-4, "atol": 1e-4}, "rows": {"rtol": 1e-3, "atol": 1e-3}}
BUDGET_S, TOTAL_S = {"a": 150, "b": 60, "c": 45, "d": 60, "e": 240}, 480  # soft limits (b-e halved by --quick)
SECTIONS = {"a": "cuda_tests", "b": "twin", "c": "syncs", "d": "pinned", "e": "step_time"}
TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=256, tie=True)
SHAPES = {"smollm2_135m": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, tie=True),
          "tinyllama_1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000, tie=False)}
ROWS = {"smollm2_135m": 16384, "tinyllama_1.1b": 8192}  # adapter_rows per layer in e (--quick: 4096)
LARGE = ("tinyllama_1.1b", 8, 1024)  # e's larger-batch point: shape, batch, tokens per sequence
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2",
            "unique_dim", "unique_consecutive", "allclose"}


# ------------------------------------------------------------------------------------------ helpers
def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def llama(dev: str, dtype, *, hidden, inter, layers, heads, kv, vocab, tie, seed=0):
    """LlamaForCausalLM of this shape with seeded random weights, built on `dev` (nothing from a hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(dev):
        return LlamaForCausalLM(cfg).to(dtype)


def batch(dev: str, vocab: int, b: int, t: int, seed: int = 1) -> dict:
    ids = torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed)).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def wrap(model, **kw):
    """meft.wrap(model, MeftConfig(**kw)) minus the fields this build lacks; -> (runtime, dropped fields)."""
    import meft

    known = {f.name for f in dataclasses.fields(meft.MeftConfig)}
    meft.wrap(model, meft.MeftConfig(**{k: v for k, v in kw.items() if k in known}))
    return model.meft, sorted(set(kw) - known)


def short(path: str) -> str:
    p = Path(path).resolve()
    if "site-packages" in p.parts:
        return "/".join(p.parts[p.parts.index("site-packages") + 1:])
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def compare(a, b, tol) -> tuple[float, bool]:
    """(max abs diff, torch.testing.assert_close(a[i], b[i], **tol) holds for every i)."""
    a, b = [x.float().cpu() for x in a], [y.float().cpu() for y in b]
    diff = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    try:
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **tol)
        return diff, True
    except (AssertionError, ValueError):
        return diff, False


def release(model=None) -> None:
    """Unwrap (closes the runtime: scheduler threads, pending updates) and give memory back."""
    import meft

    if hasattr(model, "meft"):
        meft.unwrap(model)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # cached pinned blocks back to CUDA


# ------------------------------------------------------------------------------ a: CUDA tests
def sec_cuda_tests(a, dev, deadline):
    if dev != "cuda" or importlib.util.find_spec("pytest") is None:
        why = "needs CUDA" if dev != "cuda" else "pytest is not installed"
        return {"skipped": why, "passed": None, "summary": f"skipped ({why})"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/", "--continue-on-collection-errors",
               "-p", "no:cacheprovider", f"--junitxml={xml}"]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True, timeout=max(10.0, deadline - time.monotonic()))
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        res = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[2:7])}
        if not xml.exists():
            return {**res, "passed": False, "output_tail": out[-3000:], "summary": f"no junit xml (rc {rc})"}
        counts, failing, uncollected = Counter(), [], []
        for tc in ET.parse(xml).getroot().iter("testcase"):
            bad = next((c for c in tc if c.tag in ("failure", "error", "skipped")), None)
            name = f"{tc.get('classname')}::{tc.get('name')}".lstrip(":")
            if bad is not None and "collection failure" in bad.get("message", ""):
                uncollected.append(name)  # a module that did not import here (e.g. a missing optional dep)
                continue
            counts["passed" if bad is None else bad.tag] += 1
            if bad is not None and bad.tag != "skipped":
                failing.append(name)
    res.update(passed_tests=counts["passed"], failed=counts["failure"], errors=counts["error"],
               skipped=counts["skipped"], failing=failing, collection_errors=uncollected,
               passed=not failing and counts["passed"] > 0)
    if failing or uncollected or rc not in (0, 5):
        res["output_tail"] = out[-3000:]
    res["summary"] = (f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
                      f"{counts['skipped']} skipped, {len(uncollected)} modules not collected")
    return res


# ------------------------------------------------------------------------- b: offloaded == resident
def _train_twin(dev, kw, steps, offload):
    model = llama(dev, torch.float32, **TINY)
    rt, dropped = wrap(model, adapter_rows=512, expert_size=16, experts_per_token=2, max_active_rows=128,
                       adapter_lr=1e-2, router_lr=1e-2, offload=offload, **kw)
    accum = getattr(rt.config, "grad_accum_steps", 1)
    model.train()
    data, losses = batch(dev, TINY["vocab"], 4, 16)["input_ids"], []
    for _ in range(steps):
        total = 0.0
        for part in data.chunk(accum):
            loss = model(input_ids=part, labels=part).loss / accum
            loss.backward()
            total += float(loss.detach())
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(total)
    rt.sync_to_host()  # applies a staleness-1 update; the resident twin copies its device rows back
    rows = [s.weights.clone() for s in rt.stores] + [ad.gate.detach().float().cpu() for ad in rt.adapters]
    engine = getattr(getattr(rt.scheduler, "engine", None), "name", None)
    name = type(rt.scheduler).__name__ + (f"({engine} engine)" if engine else "")
    release(model)
    return losses, rows, name, dropped


def sec_twin(a, dev, deadline):
    steps = 3 if a.quick else 6
    cases = {"plain": {}, "accum2_clip_layer": dict(grad_accum_steps=2, clip="layer", max_norm=0.5),
             "stale1_clip_global": dict(staleness=1, clip="global", max_norm=0.5),
             "zero_copy": dict(fetch_mode="zero_copy"),
             "zero_copy_stale1_accum2": dict(fetch_mode="zero_copy", staleness=1, grad_accum_steps=2)}
    out, ok, parts = {"tolerance": TOL, "steps": steps}, True, []
    for name, wire in ((n, w) for w in ("bfloat16", "float32") for n in cases):
        name, kw = f"{name}_{wire}", dict(cases[name], wire_dtype=wire)
        if time.monotonic() > deadline:
            out[name], ok = {"skipped": "time budget"}, False
            continue
        (l_off, r_off, s_off, dropped), (l_res, r_res, s_res, _) = (_train_twin(dev, kw, steps, off)
                                                                    for off in (True, False))
        dl, lok = compare([torch.tensor(l_off)], [torch.tensor(l_res)], TOL["loss"])
        dr, rok = compare(r_off, r_res, TOL["rows"])
        res = {"schedulers": [s_off, s_res], "losses_offload": l_off, "losses_resident": l_res,
               "loss_max_abs_diff": dl, "rows_max_abs_diff": dr, "loss_close": lok, "rows_close": rok,
               "trained": l_off[-1] < l_off[0], "unsupported_fields": dropped}
        res["passed"] = lok and rok and res["trained"] and not dropped
        ok &= res["passed"]
        out[name] = res
        parts.append(f"{name}: loss {dl:.1e} rows {dr:.1e}")
    out.update(passed=ok, summary="; ".join(parts) + " (max abs diff)")
    return out


# ------------------------------------------------------------------------------------ c: syncs
def _site(stack) -> str:
    """Innermost frame in meft/ or offload/, else innermost outside torch and this file."""
    frames = [(short(f.filename), f) for f in stack if "gpu_check" not in f.filename]
    for pick in (lambda s: s.split("/")[0] in ("meft", "offload"), lambda s: not s.startswith("torch/")):
        for s, f in reversed(frames):
            if pick(s):
                return f"{s}:{f.lineno} ({f.name})"
    return "?"


def _sync_name(func, args, kwargs, dev):
    """Name of a host-synchronising op (on CUDA) touching a `dev` tensor, else None."""
    from torch.utils._pytree import tree_flatten

    base, ov = func._schema.name.split("::")[-1], func._overloadname
    if not any(isinstance(x, torch.Tensor) and x.device.type == dev for x in tree_flatten((args, kwargs))[0]):
        return None
    if base in SYNC_OPS:
        return base
    if base == "repeat_interleave" and ov == "Tensor" and kwargs.get("output_size") is None:
        return "repeat_interleave.Tensor"
    if base in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return f"{base}(bool mask)"
    if base == "_to_copy" and dev != "cpu" and args[0].device.type == dev and not kwargs.get("non_blocking"):
        return "device_to_host_copy" if str(kwargs.get("device", "")).startswith("cpu") else None
    if base == "copy_" and dev != "cpu" and args[1].device.type == dev and args[0].device.type == "cpu":
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return "device_to_host_copy" if blocking or not args[0].is_pinned() else None
    return None


def _phase(dev, fn):
    """fn() under the counting dispatch mode (and sync debug mode 'warn' on CUDA) -> (value, counts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = _sync_name(func, args, kwargs, dev)
            if name is not None:
                sites[f"{name} @ {_site(traceback.extract_stack()[:-1])}"] += 1
            return func(*args, **kwargs)

    sites = Counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if dev == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with SyncOps():
                value = fn()
            sync(dev)
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    ops = sum((Counter({s.split(" @ ")[0]: n}) for s, n in sites.items()), Counter())
    res = {"dispatch_ops": dict(ops), "dispatch_total": sum(ops.values()), "dispatch_top_sites": sites.most_common(10),
           "dispatch_in_meft_offload": sum(n for s, n in sites.items()
                                           if s.split(" @ ")[1].split("/")[0] in ("meft", "offload"))}
    if dev == "cuda":
        w = [x for x in rec if "synchroniz" in str(x.message)]
        res["sync_debug_warnings"] = len(w)
        res["sync_debug_top_sites"] = Counter(f"{short(x.filename)}:{x.lineno}" for x in w).most_common(10)
    return value, res


def _syncs_of_a_step(dev, fetch_mode) -> dict:
    shape = dict(TINY, hidden=128, inter=256)
    model = llama(dev, torch.bfloat16 if dev == "cuda" else torch.float32, **shape)
    rt, _ = wrap(model, adapter_rows=1024, expert_size=16, experts_per_token=4, max_active_rows=256,
                 fetch_mode=fetch_mode)
    data = batch(dev, shape["vocab"], 4, 64)
    model.train()

    opt_step = lambda: (rt.optimizer.step(), rt.optimizer.zero_grad())
    model(**data).loss.backward()  # warm-up step: lazy allocations, numba kernels, cuBLAS handles
    opt_step()
    out = {}
    loss, out["forward"] = _phase(dev, lambda: model(**data).loss)
    _, out["backward"] = _phase(dev, loss.backward)
    _, out["optimizer_step"] = _phase(dev, opt_step)
    release(model)
    out["adapter_path_sync_ops"] = sum(out[k]["dispatch_in_meft_offload"] for k in ("forward", "backward"))
    return out


def sec_syncs(a, dev, deadline):
    out, parts = {}, []
    for mode in ("staged", "zero_copy"):
        r = out[mode] = _syncs_of_a_step(dev, mode)
        w = {k: r[k].get("sync_debug_warnings") for k in ("forward", "backward", "optimizer_step")}
        parts.append(f"{mode}: sync-class ops fwd {r['forward']['dispatch_total']} bwd "
                     f"{r['backward']['dispatch_total']} (in meft/offload: {r['adapter_path_sync_ops']}); "
                     f"sync-debug warnings {w}")
    # docs/design.md "One training step": no host sync in the adapter path
    out.update(passed=all(out[m]["adapter_path_sync_ops"] == 0 for m in ("staged", "zero_copy")),
               summary="; ".join(parts))
    return out


# ------------------------------------------------------------------------------------ d: pinned
def _host_tensors(obj, path="rt", seen=None, out=None, depth=6):
    """CPU tensors reachable from `obj` through attributes, __slots__ and containers: {storage: (path, t)}.
    Generic on purpose: it does not depend on the runtime's attribute names."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    skip = (str, bytes, int, float, type, torch.nn.Module, threading.Thread)
    if depth < 0 or id(obj) in seen or isinstance(obj, skip):
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu" and not isinstance(obj, torch.nn.Parameter):
            out.setdefault(obj.untyped_storage().data_ptr(), (path, obj))
        return out
    if isinstance(obj, dict):
        items = [(f".{k}", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [("", v) for v in obj]
    else:
        names = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
        items = [(f".{n}", getattr(obj, n, None)) for n in names]
        items += [(f".{n}", v) for n, v in getattr(obj, "__dict__", {}).items() if n != "backbone_params"]
    for name, v in items:
        if not callable(v) or isinstance(v, torch.Tensor):
            _host_tensors(v, path + name, seen, out, depth - 1)
    return out


def _host_stats(dev) -> dict:
    if dev != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    return {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k and k.endswith("current")}


def _staging_counted(rt):
    c = rt.config
    if not c.offload:
        return None
    live = 2 * c.budget_rows if c.prefetch == "lookahead" else c.budget_rows
    mirror_rows = c.adapter_rows if getattr(c, "fetch_mode", "staged") == "zero_copy" else 0
    return offload.TransferScheduler.staging_bytes(len(rt.stores), c.budget_rows, rt.stores[0].width, c.wire,
                                                   max_live_rows=live, zero_copy_rows=mirror_rows)


def sec_pinned(a, dev, deadline):
    out = {m: _pinned_of_wrap(a, dev, m) for m in ("staged", "zero_copy")}
    out.update(passed=None if dev != "cuda" else all(out[m]["passed"] for m in ("staged", "zero_copy")),
               summary="; ".join(f"{m}: {out[m]['summary']}" for m in ("staged", "zero_copy")))
    return out


def _pinned_of_wrap(a, dev, fetch_mode):
    import psutil

    shape = dict(TINY, hidden=576, inter=1536, heads=9, kv=3, layers=2 if a.quick else 4)
    model = llama(dev, torch.bfloat16 if dev == "cuda" else torch.float32, **shape)
    proc = psutil.Process()
    gc.collect()
    rss0, hs0, t0 = proc.memory_info().rss, _host_stats(dev), time.perf_counter()
    rt, _ = wrap(model, adapter_rows=6144 if a.quick else 12288, expert_size=16, max_active_rows=1024,
                 fetch_mode=fetch_mode)
    out = {"adapter_rows": rt.config.adapter_rows, "layers": shape["layers"],
           "wrap_s": round(time.perf_counter() - t0, 2), "rss_delta_of_wrap": proc.memory_info().rss - rss0,
           "host_allocator_before": hs0, "host_allocator_after_wrap": _host_stats(dev)}
    model.train()
    model(**batch(dev, shape["vocab"], 2, 32)).loss.backward()  # one step: lazily allocated buffers too
    rt.optimizer.step()
    hs1 = out["host_allocator_after_step"] = _host_stats(dev)
    owners, exact, pow2, n, host = Counter(), 0, 0, 0, 0
    for path, t in _host_tensors(rt).values():
        nb = t.untyped_storage().nbytes()
        host += nb
        if t.is_pinned():
            n, exact, pow2 = n + 1, exact + nb, pow2 + (1 << max(nb - 1, 0).bit_length())
            owners[".".join(path.split(".")[:3])] += nb
    key = next((k for k in ("allocated_bytes.current", "allocated_bytes.all.current") if k in hs1), None)
    held = None if key is None else hs1[key] - hs0.get(key, 0)
    out.update(host_tensor_bytes=host, store_bytes=sum(s.nbytes for s in rt.stores), pinned_tensors=n,
               pinned_exact_bytes=exact, pinned_if_pow2_rounded=pow2, pinned_by_owner=dict(owners.most_common(12)),
               pinned_held_by_allocator=held, rounding=round(held / exact, 3) if held and exact else None)
    eng = getattr(rt.scheduler, "engine", None)
    out["engine_pinned_bytes"] = getattr(eng, "pinned_bytes", None)  # what the engine registered, exactly
    out["staging_bytes_counted"] = _staging_counted(rt)  # what wrap's RAM check and `meft plan` count
    release(model)
    stores_pinned = any(k.startswith("rt.stores") and not k.endswith(".mirror") for k in owners)
    # docs/design.md "Devices": pinned only what the device reads (staging, zero-copy mirror), exact size, as counted
    out["passed"] = None if dev != "cuda" else (not stores_pinned and (out["rounding"] or 1.0) < 1.05
                                                and out["engine_pinned_bytes"] == out["staging_bytes_counted"])
    mib = 2**20
    out["summary"] = (f"pinned {exact / mib:.1f} MiB exact in {n} tensors (as pow2 blocks {pow2 / mib:.1f} MiB; "
                      f"allocator holds {None if held is None else round(held / mib, 1)} MiB); stores pinned: "
                      f"{stores_pinned}; host tensors {host / mib:.1f} MiB; wrap {out['wrap_s']} s")
    return out


# --------------------------------------------------------------------------------- e: step time
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


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller configs, fewer steps, half the time budgets")
    ap.add_argument("--only", default="", help="comma-separated sections: a,b,c,d,e (or their names)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)  # 'cpu': dry run without a GPU
    a = ap.parse_args(argv)
    dev = a.device or ("cuda" if torch.cuda.is_available() else None)
    result = {"cuda": torch.cuda.is_available()}
    if dev is None:
        print("no CUDA device present: nothing to check (--device cpu runs a dry run on the CPU)")
    else:
        import transformers

        if dev == "cpu":
            torch.set_num_threads(1)  # dry run: the host worker and copy threads need the other cores
        t_all = time.monotonic()
        result.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
                      torch=torch.__version__, transformers=transformers.__version__, quick=a.quick, sections={})
        names = {v: k for k, v in SECTIONS.items()}
        only = {names.get(x.strip(), x.strip()) for x in a.only.split(",") if x.strip()} or set(SECTIONS)
        funcs = {"a": sec_cuda_tests, "b": sec_twin, "c": sec_syncs, "d": sec_pinned, "e": sec_step_time}
        for key in sorted(only & set(SECTIONS)):
            t0 = time.monotonic()
            quick = a.quick and dev == "cuda" and key != "a"  # the tests take what they take
            deadline = min(t0 + BUDGET_S[key] * (0.5 if quick else 1.0), t_all + TOTAL_S)
            try:
                res = {"ok": True, "error": None, **funcs[key](a, dev, deadline)}
            except Exception:  # noqa: BLE001 - one section's failure must not hide the others
                res = {"ok": False, "error": traceback.format_exc()[-2000:], "passed": False, "summary": "raised"}
            res["seconds"] = round(time.monotonic() - t0, 1)
            result["sections"][f"{key}_{SECTIONS[key]}"] = res
            release()  # whatever the section left behind, also after a failure
        secs = result["sections"].values()
        result.update(all_ok=all(s["ok"] for s in secs), all_passed=all(s.get("passed") is not False for s in secs),
                      total_s=round(time.monotonic() - t_all, 1))
        print(f"\n{'section':<14}{'ok':<5}{'passed':<8}{'s':>7}  summary")
        for name, s in result["sections"].items():
            print(f"{name:<14}{'yes' if s['ok'] else 'NO':<5}{s.get('passed')!s:<8}{s['seconds']:>7}  {s['summary']}")
            if s["error"]:
                print("  " + s["error"].strip().splitlines()[-1])
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0 if result.get("all_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
