"""`meft profile`: N training steps of a `meft train` setup under the TrafficMeter, and their report.

Owns: per-layer compute timing (forward hooks on each adapted decoder layer; backward from gradient
hooks on the layer outputs -- layer l's backward runs from the arrival of its output gradient to the
arrival of layer l-1's, recorded with `meter.record_compute`), an independent count of the active
sets (each adapter input is re-routed by the runtime's own rule, `MeftRuntime.route_training`, in a forward
pre-hook, so the bytes the
meter recorded can be checked against rows x width x wire bytes), the comparison with MEFT's original
transfer scheme for the same active sets, the link prediction (`meft.profile.report`), and writing
profile.json, trace.json (Chrome trace) and profile.png. Setup and the step itself come from
`meft.train.loop` (`setup_run`, `train_step`): a profile runs exactly what `meft train` runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from meft.adapter.runtime import in_backward
from meft.adapter.targets import find_targets
from meft.config import MeftConfig
from meft.data.packed import resolve_packing
from meft.profile.report import build_report, format_report, plot_profile
from meft.train.args import TrainArgs
from meft.train.loop import lay_out, locality_background, setup_run, train_step

__all__ = ["profile", "LayerTimer", "ActiveSetCounter"]


class LayerTimer:
    """Forward / backward compute intervals of decoder layers, recorded into a TrafficMeter."""
    def __init__(self, layers, meter):
        self.layers, self.meter = list(layers), meter  # [(index, module)]
        self._t0: dict[int, float] = {}
        self._grad_at: dict[int, float] = {}
        self._handles = []
        for i, mod in self.layers:
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=i: self._pre(i)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, i=i: self._post(i, o)))

    def _pre(self, i: int) -> None:
        if not in_backward():
            self._t0[i] = time.perf_counter()

    def _post(self, i: int, out) -> None:
        if in_backward() or i not in self._t0:
            return  # gradient-checkpoint recomputation: inside layer i's backward interval
        self.meter.record_compute(f"fwd L{i}", self._t0.pop(i), time.perf_counter())
        t = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, i=i: self._on_grad(i))

    def _on_grad(self, i: int) -> None:
        if not self._grad_at:  # first layer of this backward: run end_backward when the pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)
        self._grad_at[i] = time.perf_counter()

    def end_backward(self) -> None:
        """End of a backward pass: layer l's backward = [grad at its output, grad at layer l-1's output]."""
        end = time.perf_counter()
        order = sorted(self._grad_at, reverse=True)
        for k, i in enumerate(order):
            stop = self._grad_at[order[k + 1]] if k + 1 < len(order) else end
            self.meter.record_compute(f"bwd L{i}", self._grad_at[i], stop)
        self._grad_at.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ActiveSetCounter:
    """Re-routes every adapter input (training forwards only) to count rows and tokens per layer.
    `runtime`: the wrapped model's MeftRuntime (`model.meft`), whose routing rule is applied."""
    def __init__(self, adapters, runtime):
        self.runtime = runtime
        self.rows = defaultdict(int)    # adapter index -> rows fetched (sum over micro-batches)
        self.tokens = defaultdict(int)  # adapter index -> tokens routed
        self._handles = [ad.register_forward_pre_hook(self._pre) for ad in adapters]

    def _pre(self, ad, args) -> None:
        if not (ad.training and torch.is_grad_enabled()) or in_backward():
            return
        x = ad._tapped if ad._tapped is not None else args[0]
        x2 = x.reshape(-1, ad.d)  # [T, d]
        r = self.runtime.route_training(ad, x2)  # the runtime's own rule: padding excluded, budget applied
        self.rows[ad.index] += r.n_rows
        self.tokens[ad.index] += x2.shape[0]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _attach(model, rt):
    targets = find_targets(model, rt.config.target_module)
    by_layer = {t.layer: t.parent for t in targets}
    timer = LayerTimer([(ad.index, by_layer[ad.layer]) for ad in rt.adapters], rt.meter)
    return timer, ActiveSetCounter(rt.adapters, rt)


def _run_steps(model, rt, data, args, cfg, background=None) -> dict:
    accum, tokens, step_s = cfg.grad_accum_steps, 0, []
    input_tokens = 0  # positions computed: padding included, a packed batch's shared prefix once
    pack = resolve_packing(args.packing, model)
    for step in range(1, args.steps + 1):
        raw = [next(data.batches) for _ in range(accum)]
        if background is not None:  # the locality term's background questions, as meft train adds them
            raw = background.join(raw, step, 0, data.batches.pad_token_id)
        batches = [lay_out(model, b, pack) for b in raw]  # as meft train computes them
        input_tokens += sum(int(b["input_ids"].numel()) for b in batches)
        t0 = time.perf_counter()
        _, n = train_step(model, rt, batches, accum, locality_weight=cfg.locality_weight)
        step_s.append(time.perf_counter() - t0)
        tokens += n
    total = sum(step_s)
    return {"steps": args.steps, "step_s": step_s, "labelled_tokens": tokens, "input_tokens": input_tokens,
            "tokens_per_s": tokens / total, "input_tokens_per_s": input_tokens / total}


def profile(args: TrainArgs, cfg: MeftConfig, *, link: str | None = None,
            compute_ms_per_layer: float | None = None, link_latency_us: float = 10.0) -> dict:
    """Profile `args.steps` steps (default 5 when 0); write profile.json, trace.json, profile.png."""
    cfg = dataclasses.replace(cfg, copy_timing=True).validate()  # exact copy durations from CUDA events
    if args.steps <= 0:
        args.steps = 5
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meft, model, tok, data = setup_run(args, cfg)
    background = locality_background(cfg, tok, data)  # None unless locality_weight > 0
    model.train()
    meft.wrap(model, cfg)
    rt = model.meft
    if rt.meter is None:
        raise ValueError("meft profile needs the offloaded TransferScheduler (offload=True): the resident "
                         "twin moves no rows and has no TrafficMeter; fix: drop --offload false")
    timer, counter = _attach(model, rt)
    try:
        run = _run_steps(model, rt, data, args, cfg, background)
    finally:
        timer.remove()
        counter.remove()
        rt.close()
    d = rt.adapters[0].d
    active = {"rows": dict(counter.rows), "tokens": dict(counter.tokens), "width": rt.stores[0].width, "d": d,
              "wire_bytes": cfg.wire.itemsize}
    rep = build_report(rt.meter, run, active, link=link, compute_ms_per_layer=compute_ms_per_layer,
                       link_latency_us=link_latency_us, threads=getattr(rt.scheduler, "thread_plan", None),
                       config={"train": asdict(args), "meft": cfg.to_dict()})
    (out / "profile.json").write_text(json.dumps(rep, indent=2, default=str))
    rt.meter.export_chrome_trace(out / "trace.json")
    plot_profile(rt.meter, rep, out / "profile.png")
    print(format_report(rep), flush=True)
    print(f"meft profile: wrote {out / 'profile.json'}, {out / 'trace.json'} (open in ui.perfetto.dev), "
          f"{out / 'profile.png'}", flush=True)
    return rep
