"""Section c of the GPU validation kit: host synchronisations in one training step of the wrapped model.
Forward, backward and optimizer step run under torch.cuda.set_sync_debug_mode("warn") (warnings counted,
top call sites) and a TorchDispatchMode counting sync-class aten ops with their call sites; the adapter
path (meft/, offload/) must have none (docs/design.md "One training step"). Staged and zero-copy fetch.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter

import torch

from experiments.gpu_check_sections.common import TINY, batch, llama, release, short, sync, wrap

SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2",
            "unique_dim", "unique_consecutive", "allclose"}


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
