"""Stored vs generated frozen keys at the quick start's adapter shape: bytes, host update time, host store.

The quick start's adapter (SmolLM2-135M widths: d=576, 30 layers; MeftConfig defaults: 4,096 rows per layer,
16 per expert, 4 experts per token, a 1,024-row budget, bf16 wire, fp32 moments) on a random-weight Llama
with those widths and a small vocabulary (the LM head is not what is measured). The same batches train
`--steps` steps with `key_source="stored"` ([K | V] rows, the path before generated keys, its stored keys
set to the generated ones so both route the same rows) and `"generated"` (values only);
the traffic meter gives the bytes each way and the host update time per step, the stores their bytes.
Printed, not asserted: `new / old` for D2H bytes per step, host update ms per step and host store bytes; and
the host AdamW alone on the same rows (interleaved repeats, median: the step's update time is noisy on a
shared CPU).

    .venv/bin/python experiments/bench_keys.py --steps 5 [--layers 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import meft
from meft.adapter import init_gate, key_table
from meft.config import MeftConfig
from offload import RowStore, SparseAdamW


def _model(layers: int, d: int, seed: int = 0):
    torch.manual_seed(seed)
    heads, kv = (9, 3) if d % 9 == 0 else (4, 2)  # SmolLM2-135M's 9 / 3 at d=576
    cfg = LlamaConfig(hidden_size=d, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=2048, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def _use_generated_keys(rt) -> None:
    """Stored [K | V] rows whose keys (and gates) are the generated ones: the same rows route and cross."""
    with torch.no_grad():
        for ad, s in zip(rt.adapters, rt.stores):
            keys = key_table(s.n_rows, seed=rt.config.seed, layer=ad.layer, d=ad.d)  # [N, d]
            rows = s.weights.clone()
            rows[:, :ad.d] = keys
            s.set_weights(rows)
            ad.gate.copy_(init_gate(keys, rt.config.expert_size))
    rt.stores_changed()


def run(key_source: str, args) -> dict:
    model = meft.wrap(_model(args.layers, args.d), MeftConfig(key_source=key_source))
    rt = model.meft
    if key_source == "stored":
        _use_generated_keys(rt)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 2048, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]
    model.train()
    for i, ids in enumerate(batches):
        if i == 1:  # the first step warms the kernels up; the meter counts from here
            down0, up0, rows0, upd0 = rt.traffic_totals()
            t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    rt.sync_to_host()
    wall = time.perf_counter() - t0
    down, up, rows, upd = rt.traffic_totals()
    out = {"key_source": key_source, "row_width": rt.stores[0].width,
           "store_bytes": sum(s.nbytes for s in rt.stores),
           "h2d_bytes_per_step": (down - down0) / args.steps, "d2h_bytes_per_step": (up - up0) / args.steps,
           "rows_per_step": (rows - rows0) / args.steps, "host_update_ms_per_step": (upd - upd0) / args.steps,
           "step_s": wall / args.steps}
    rt.close()
    return out


def update_kernel_ms(args) -> dict:
    """The host AdamW alone: per layer `--rows-per-layer` random rows of a 4,096-row store, [K | V] (2d) vs
    values (d) wide, the two interleaved `--repeats` times over `--layers` layers; median ms per step."""
    g = torch.Generator().manual_seed(2)
    opts = {w: [SparseAdamW(RowStore(4096, w)) for _ in range(args.layers)] for w in (2 * args.d, args.d)}
    ids = [torch.randperm(4096, generator=g)[:args.rows_per_layer].sort().values for _ in range(args.layers)]
    grads = {w: torch.randn(args.rows_per_layer, w, generator=g) for w in opts}
    times = {w: [] for w in opts}
    for _ in range(args.repeats):
        for w, layer_opts in opts.items():
            t0 = time.perf_counter()
            for opt, i in zip(layer_opts, ids):
                opt.step_rows(i, grads[w])
            times[w].append((time.perf_counter() - t0) * 1e3)
    med = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
    return {"stored_ms": med[2 * args.d], "generated_ms": med[args.d], "new_over_old": med[args.d] / med[2 * args.d]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rows-per-layer", type=int, default=672, help="the host update's rows (the quick start's "
                   "~20,150 rows per step over 30 layers)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    old, new = run("stored", args), run("generated", args)
    ratios = {k: new[k] / old[k] for k in ("d2h_bytes_per_step", "h2d_bytes_per_step", "host_update_ms_per_step",
                                           "store_bytes", "step_s")}
    res = {"stored": old, "generated": new, "new_over_old": ratios, "update_kernel": update_kernel_ms(args)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k in ratios:
            print(f"{k:>26}: stored {old[k]:>14,.1f}  generated {new[k]:>14,.1f}  new/old {ratios[k]:.3f}")
        print(f"{'rows_per_step':>26}: stored {old['rows_per_step']:>14,.1f}  generated {new['rows_per_step']:>14,.1f}")
        k = res["update_kernel"]
        print(f"{'host AdamW alone (ms/step)':>26}: stored {k['stored_ms']:>14,.1f}  generated "
              f"{k['generated_ms']:>14,.1f}  new/old {k['new_over_old']:.3f}")
    return res


if __name__ == "__main__":
    main()
