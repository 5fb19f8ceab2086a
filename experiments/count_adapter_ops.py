"""Aten ops the sparse adapter adds to a training forward, per adapted layer (CPU, eager mode).

Owns the count that tells whether the adapter's forward is a handful of fused ops or a long tail of small
launches: on a GPU each aten op is at least one kernel launch, and at a 7B shape the adapter's share of the
launch stream decides whether MEFT's step can keep up with LoRA's. A `TorchDispatchMode` records every aten
op a forward runs; the count of the plain model's forward (same weights, same batch, training mode) is
subtracted from the wrapped model's, and the difference is divided by the number of adapted layers.
Everything the adapter adds is counted: routing, the runtime's row request, the adapter math, hooks.

    python experiments/count_adapter_ops.py            # tiny Llama: ops per adapted layer, top ops
    python experiments/count_adapter_ops.py --json     # last stdout line: one JSON object

`count_ops(fn)` and `adapter_ops_per_layer(model, batch, wrap_fn)` are what experiments/bench_7b.py and
tests/meft/adapter/test_op_count.py use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

__all__ = ["count_ops", "adapter_ops_per_layer", "tiny_llama", "main"]


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> tuple[Counter, object]:
    """(aten op name -> calls, fn's result) for one call of `fn()` under a dispatch mode."""
    with _Counter() as c:
        out = fn()
    return c.ops, out


def adapter_ops_per_layer(model, batch: dict, wrap_fn) -> dict:
    """Ops per adapted layer that `wrap_fn(model)` adds to `model(**batch)` in training mode.

    The plain forward is counted first, then the model is wrapped and its forward counted (the loss's
    backward runs after it so the runtime's step stays well formed). Returns {"per_layer", "plain",
    "wrapped", "layers", "top"} where top is the ten ops the adapter adds most of (per layer)."""
    import meft

    model.train()
    plain, _ = count_ops(lambda: model(**batch))
    wrap_fn(model)
    layers = len(model.meft.summary()["layers"])
    wrapped, out = count_ops(lambda: model(**batch))
    out.loss.backward()
    model.meft.optimizer.zero_grad(set_to_none=True)
    added = wrapped.copy()
    added.subtract(plain)
    meft.unwrap(model)
    return {"per_layer": (sum(wrapped.values()) - sum(plain.values())) / layers, "plain": sum(plain.values()),
            "wrapped": sum(wrapped.values()), "layers": layers,
            "top": {k: round(v / layers, 2) for k, v in added.most_common(10)}}


def tiny_llama(layers: int = 2, hidden: int = 64, seed: int = 0):
    """A seeded random LlamaForCausalLM (fp32, CPU) and a 2 x 16 batch of real tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                      pad_token_id=0, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main(argv=None) -> dict:
    import meft

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--offload", action="store_true", help="rows on the host (TransferScheduler); default: "
                    "resident rows (the same adapter path, no copy threads)")
    a = ap.parse_args(argv)
    cfg = meft.MeftConfig(adapter_rows=256, expert_size=16, experts_per_token=4, max_active_rows=64,
                          offload=a.offload)
    out = {}
    # general: dense products over the micro-batch's rows (what a GPU runs); token_rows: the CPU's per-token
    # numba path for fp32 activations (MeftRuntime.token_rows, on by default on a CPU)
    for path in ("general", "token_rows"):
        model, batch = tiny_llama()

        def wrap(m, path=path):
            meft.wrap(m, cfg)
            m.meft.token_rows = path == "token_rows"

        res = out[path] = adapter_ops_per_layer(model, batch, wrap)
        print(f"{path}: aten ops per adapted layer in a training forward: {res['per_layer']:.1f} "
              f"(plain forward {res['plain']}, wrapped {res['wrapped']}, {res['layers']} adapted layers)")
        for name, n in res["top"].items():
            print(f"  {name:<28}{n:>6}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
