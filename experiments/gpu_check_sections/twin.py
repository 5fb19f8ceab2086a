"""Section b of the GPU validation kit: the offloaded runtime (TransferScheduler) and the resident one
(offload.ResidentScheduler) train the same tiny Llama a few steps; losses and adapter rows must agree
within TOL: plain, with accumulation and clipping, at staleness 1, and zero-copy, on a bf16 and an fp32
wire.
"""

from __future__ import annotations

import time

import torch

from experiments.gpu_check_sections.common import TINY, batch, compare, llama, release, wrap

# The twins round rows and grads to the wire dtype alike and differ only in the AdamW arithmetic (numba
# on the host vs torch on the device) and summation order: ~1 ulp of the fp32 rows per step. Adam turns an
# ulp of a near-zero gradient (or a flipped bf16 rounding of a row) into a visibly different step of that
# element, bounded by ~lr = 1e-2: measured on the CPU, 6 steps, max row diff 1e-4 (bf16 and fp32 wire).
# Stale or not-yet-landed rows would move whole rows by ~lr and the losses by ~1e-3.
TOL = {"loss": {"rtol": 1e-4, "atol": 1e-4}, "rows": {"rtol": 1e-3, "atol": 1e-3}}


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
