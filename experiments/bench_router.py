"""Eager vs compiled routing (`meft.adapter.route(..., compiled=True)`): time per call, and on a GPU the kernels.

Owns the measurement behind `MeftConfig.compile_router`: whether fusing the fixed-shape routing with
`torch.compile` helps where it runs. Shapes: the quick start's (SmolLM2-135M: d = 576, 256 experts of 16 rows,
4 per token, a 1,024-row budget, 2,048 tokens with 10% padding) and a 7B's (d = 4,096, 1,024 experts of 16
rows, 4 per token, 1,024 rows, 2,048 tokens). Per shape: the first compiled call (compile time, once per
process), then `--calls` timed calls of each, alternating eager and compiled (the machine may be shared),
medians reported; results equal (ids, slots, re-routed experts); on CUDA, the kernels one call launches
(torch.profiler; copies and memsets left out) -- on the CPU the compiled graph cannot be counted with a
dispatch mode, so launches are reported for CUDA only.

    python experiments/bench_router.py [--calls 15] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meft.adapter import route  # noqa: E402

__all__ = ["main", "measure"]

SHAPES = {"quickstart": dict(d=576, experts=256, tokens=2048), "7b": dict(d=4096, experts=1024, tokens=2048)}
KW = dict(experts_per_token=4, expert_size=16, max_active_rows=1024)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _kernels(fn, dev: str) -> int | None:
    if dev != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(dev)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def measure(shape: dict, dev: str, calls: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["tokens"], shape["d"], generator=g).to(dev, dtype)  # [T, d]
    gate = torch.nn.functional.normalize(torch.randn(shape["experts"], shape["d"], generator=g), dim=1).to(dev)
    valid = (torch.rand(shape["tokens"], generator=g) > 0.1).to(dev)  # [T] 10% padding
    eager = lambda: route(x, gate, valid=valid, **KW)  # noqa: E731
    fused = lambda: route(x, gate, valid=valid, compiled=True, **KW)  # noqa: E731
    t0 = time.perf_counter()
    rf = fused()
    _sync(dev)
    first_s = time.perf_counter() - t0
    re = eager()
    equal = all(torch.equal(getattr(rf, n), getattr(re, n)) for n in ("ids", "pos", "kept", "top_idx"))
    times = {"eager": [], "compiled": []}
    for _ in range(calls):
        for name, fn in (("eager", eager), ("compiled", fused)):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"eager_ms": med["eager"], "compiled_ms": med["compiled"],
            "compiled_over_eager": med["compiled"] / med["eager"], "first_compiled_call_s": first_s, "equal": equal,
            "kernels": {"eager": _kernels(eager, dev), "compiled": _kernels(fused, dev)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=15, help="timed calls of each (default 15)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="shapes to time")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    if a.calls < 1:
        ap.error(f"--calls {a.calls}: give at least 1 timed call")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    out = {"device": a.device, "torch": torch.__version__, "shapes": {}}
    for name in a.shapes:
        r = out["shapes"][name] = measure(SHAPES[name], a.device, a.calls, dtype)
        k = r["kernels"]
        print(f"{name}: eager {r['eager_ms']:.2f} ms, compiled {r['compiled_ms']:.2f} ms "
              f"({r['compiled_over_eager']:.2f}x), first compiled call {r['first_compiled_call_s']:.1f} s, "
              f"equal {r['equal']}" + (f", kernels {k['eager']} -> {k['compiled']}" if k["eager"] is not None else ""))
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
