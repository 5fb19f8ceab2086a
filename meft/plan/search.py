"""What would fit when a plan does not, and the plan's terminal table.

Owns `search_fits` (binary searches over fake-tensor estimates: the largest batch; for "meft" the
largest row budget `max_active_rows` in whole experts -- the only adapter size that costs GPU memory,
adapter_rows lives on the host -- and the largest adapter_rows the host RAM holds; for "dense" the
largest adapter_rows on the GPU) and `format_plan`.
"""

from __future__ import annotations

import dataclasses

from offload.text import GiB, format_bytes

__all__ = ["search_fits", "format_plan", "largest_true"]



def largest_true(lo: int, hi: int, ok) -> int | None:
    """Largest x in [lo, hi] with ok(x), assuming ok is monotone (True then False); None if none."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def search_fits(opts, cfg, res: dict, estimate) -> dict:
    """{"batch": largest batch that fits or None, "max_active_rows" | "adapter_rows": ..., "host_rows": ...}."""
    out: dict = {}
    fits_gpu = lambda o, c: estimate(o, c)["fits_gpu"]
    if not res["fits_gpu"]:
        if opts.batch > 1:
            out["batch"] = largest_true(1, opts.batch - 1,
                                        lambda b: fits_gpu(dataclasses.replace(opts, batch=b), cfg))
        if opts.method == "meft" and cfg.budget_experts > 1:
            es = cfg.expert_size
            n = largest_true(1, cfg.budget_experts - 1, lambda k: fits_gpu(
                opts, dataclasses.replace(cfg, max_active_rows=k * es)))
            out["max_active_rows"] = None if n is None else n * es
        if opts.method == "dense":
            es = cfg.expert_size
            n = largest_true(cfg.experts_per_token, cfg.adapter_rows // es - 1, lambda k: fits_gpu(
                opts, dataclasses.replace(cfg, adapter_rows=k * es)))
            out["adapter_rows"] = None if n is None else n * es
    if opts.method == "meft" and not res["fits_host"]:
        host = res["host_ram"]
        per_row = host["stores"] / cfg.adapter_rows  # bytes per row of all layers
        room = 0.9 * res["host_mem"] - (host["total"] - host["stores"])
        k = int(room // (per_row * cfg.expert_size))
        out["host_adapter_rows"] = k * cfg.expert_size if k >= cfg.experts_per_token else None
    return out


def _gib_col(n) -> str:
    return format_bytes(n, "GiB", width=7)


def format_plan(res: dict) -> str:
    b, mg = res["breakdown"], res["margin"]
    head = (f"meft plan: {res['model']} {res['dtype']}, method={res['method']}, backbone={res['backbone']}, "
            f"batch {res['batch']} x seq {res['seq']}, gradient checkpointing "
            f"{'on' if res['gradient_checkpointing'] else 'off'}")
    if res["method"] != "full":
        head += f", adapter_rows={res['adapter_rows']}"
    if res["method"] == "meft":
        head += f", active rows/layer <= {res['max_active_rows']}"
    lines = [head, "GPU (fake-tensor step under MemTracker; categories at the peak moment):"]
    for key, label in (("parameters", "parameters (+buffers)"), ("gradients", "gradients"),
                       ("optimizer_state", "optimizer state"), ("activations", "activations + temporaries"),
                       ("adapter_rows", "active adapter rows + row grad"),
                       ("row_buffers", "device row buffers [max_rows, 2d]")):
        lines.append(f"  {label:<38}{_gib_col(b[key])}")
    lines.append(f"  {'= tracked peak':<38}{_gib_col(res['tracked_peak'])}")
    lines.append(f"  {'+ CUDA context margin (stated)':<38}{_gib_col(mg['cuda_context'])}")
    lines.append(f"  {'+ allocator margin (stated)':<38}{_gib_col(mg['allocator'])}")
    if "allreduce_fp32_grad" in mg:
        lines.append(f"  {'+ fp32 gradient for the all-reduce':<38}{_gib_col(mg['allreduce_fp32_grad'])}")
    verdict = "FITS" if res["fits_gpu"] else "DOES NOT FIT"
    lines.append(f"  {'= GPU total':<38}{_gib_col(res['gpu_total'])}   vs {res['gpu_mem'] / GiB:.2f} GiB: {verdict}")
    h = res["host_ram"]
    gpus, nodes = res.get("gpus", 1), res.get("nodes", 1)
    if res["method"] == "meft" and gpus * nodes == 1:
        lines.append(f"host RAM: stores {h['stores'] / GiB:.2f} GiB + staging {h['staging'] / GiB:.3f} GiB + "
                     f"pending grads {h['pending_grads'] / GiB:.3f} GiB = {h['total'] / GiB:.2f} GiB vs "
                     f"{res['host_mem'] / GiB:.1f} GiB: {'fits' if res['fits_host'] else 'DOES NOT FIT'}")
    elif res["method"] == "meft":
        c = res["collective"]
        lines[1] = (f"data parallel: {nodes} node(s) x {gpus} GPU(s) = {gpus * nodes} ranks; GPU figures are per "
                    f"GPU (batch {res['batch']} per rank), host RAM per node") + "\n" + lines[1]
        lines.append(f"host RAM per node: stores {h['stores'] / GiB:.2f} GiB (one copy per node) + {gpus} ranks x "
                     f"(staging {h['staging'] / GiB:.3f} + pending grads {h['pending_grads'] / GiB:.3f} + exchange "
                     f"{h['exchange'] / GiB:.3f} GiB) = {h['total'] / GiB:.2f} GiB vs {res['host_mem'] / GiB:.1f} "
                     f"GiB: {'fits' if res['fits_host'] else 'DOES NOT FIT'}")
        lines.append(f"collective per step and rank (row gradients, at most {c['union_rows']} union rows/layer): "
                     f"analytic minimum {c['analytic_min'] / 2**20:.1f} MiB (ids + rows x 2d x wire bytes), "
                     f"as sent {c['as_sent'] / 2**20:.1f} MiB (fp32 block + padded ids)")
    s = res.get("search")
    if s:
        for key, label in (("batch", "largest batch that fits"),
                           ("max_active_rows", "largest row budget (max_active_rows) that fits"),
                           ("adapter_rows", "largest dense adapter_rows that fits"),
                           ("host_adapter_rows", "largest adapter_rows the host RAM holds")):
            if key in s:
                lines.append(f"  {label}: {'none' if s[key] is None else s[key]}")
    lines.append(f"verdict: {'fits' if res['fits'] else 'does not fit'}")
    return "\n".join(lines)
