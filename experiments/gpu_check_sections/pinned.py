"""Section d of the GPU validation kit: pinned host memory of a wrapped model. The pinned tensors reachable
from model.meft (stores, staging slots, ids buffers) against what the pinned allocator holds (power-of-two
rounding) and what wrap's RAM check counts; host RSS of wrap. Staged and zero-copy (the mirrors pinned at
their exact size).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter

import torch

import offload
from experiments.gpu_check_sections.common import TINY, batch, llama, release, wrap


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
