"""How far apart the adapter's output is on what it was trained on and on everything else, and what an
inference gate on it keeps: per-token ||delta h|| per layer, and known facts / general agreement under a gate.

Loads the default model with a `meft train` adapter. Per adapted layer it collects the norm of the adapter's
output `delta h` on every real token of four sets, read teacher-forced in eval mode (inference routing):
the run's training questions with their answers, their held-out phrasings, the trade-off probe's known facts
(`meft.data.retention`) and the general prompts (`meft.data.general_prompts`). It prints the quantiles of
each set, then scores, for each gate strength q, the model whose adapter output is kept only on tokens whose
norm in that layer is at least the q-th percentile of the training tokens' norms there (q = 0: no gate):
trained and held-out exact match, known facts kept, and general-prompt agreement. Nothing is trained here.

    python experiments/locality_gate.py --adapter runs/meft/adapter --out experiments/results/locality_gate.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meft import general_agreement, general_reference
from meft.adapter import load_adapter
from meft.data import (
    GENERAL_PROMPTS,
    RETENTION_MAX_NEW_TOKENS,
    load_run_data,
    prompt_ids,
    retention_records,
    with_system_prompt,
)
from meft.evaluate import qa_accuracy
from meft.pretrained import load_model
from meft.train import TrainArgs


class _Tap:
    """Records each adapter's per-token output norm and applies a per-layer gate (tau per adapter)."""

    def __init__(self, model):
        self.ads = model.meft.adapters
        self.norms: list[list[torch.Tensor]] = [[] for _ in self.ads]
        self.tau: list[float] | None = None
        self.record = False
        for i, ad in enumerate(self.ads):
            ad._delta = self._wrap(i, ad._delta)

    def _wrap(self, i, fn):
        def delta(x, *args):
            y = fn(x, *args)  # [..., d]
            n = y.float().norm(dim=-1)  # [...]
            if self.record:
                self.norms[i].append(n.reshape(-1).cpu())
            if self.tau is not None:
                y = y * (n >= self.tau[i]).unsqueeze(-1).to(y.dtype)
            return y
        return delta


def _token_norms(model, tap, tok, records, mask_fn=None) -> list[torch.Tensor]:
    """Norms per adapter over the real tokens of `records` (prompt + completion), one sequence per forward."""
    tap.norms = [[] for _ in tap.ads]
    tap.record = True
    with torch.no_grad():
        for r in records:
            ids = prompt_ids(r, tok) + tok(r.get("completion", ""), add_special_tokens=False)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    tap.record = False
    return [torch.cat(n) for n in tap.norms]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder of a `meft train` run (run_dir/adapter)")
    ap.add_argument("--out", required=True, help="results file (JSON lines), appended to")
    ap.add_argument("--quantiles", type=float, nargs="*", default=[0, 5, 10, 25, 50],
                    help="gate strengths: percentile of the training tokens' norms per layer (0 = no gate)")
    ap.add_argument("--tag", default="", help="label stored with each line")
    ap.add_argument("--eval-limit", type=int, default=64)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model("default")
    args = TrainArgs(eval_limit=a.eval_limit)
    data = load_run_data(args, tok, seed=0)
    system = data.system_prompt
    ref = general_reference(model, tok, system_prompt=system)  # the base model's continuations
    load_adapter(model, a.adapter, verbose=False)
    model.eval()
    tap = _Tap(model)
    sets = {"trained": data.eval_splits["trained"], "held_out": data.eval_splits["held_out"],
            "kept": with_system_prompt(retention_records(), system),
            "general": with_system_prompt([{"prompt": p, "completion": ""} for p in GENERAL_PROMPTS], system)}
    norms = {k: _token_norms(model, tap, tok, v) for k, v in sets.items()}
    quant = {}
    for name, per_layer in norms.items():
        allv = torch.stack([n.quantile(torch.tensor([0.1, 0.5, 0.9])) for n in per_layer])  # [L, 3]
        quant[name] = [round(v, 3) for v in allv.median(0).values.tolist()]
        print(f"{name:>9} ||dh|| per layer, median over layers of p10 / p50 / p90: {quant[name]}", flush=True)
    with Path(a.out).open("a") as f:
        f.write(json.dumps({"tag": a.tag, "norm_p10_p50_p90": quant}) + "\n")
    for q in a.quantiles:
        tap.tau = None if q == 0 else [float(n.quantile(q / 100)) for n in norms["trained"]]
        t0 = time.time()
        res = {}
        for name, key, new in (("trained", "exact_match", args.max_new_tokens),
                               ("held_out", "exact_match", args.max_new_tokens),
                               ("kept", "contains", RETENTION_MAX_NEW_TOKENS)):
            r = qa_accuracy(model, tok, sets[name], batch_size=32, max_new_tokens=new)
            res[name] = round(100 * r[key], 1)
        res["agreement"] = round(general_agreement(model, ref)["agreement"], 4)
        off = {k: round(float(sum((n < t).float().mean() for n, t in zip(norms[k], tap.tau or [0] * len(tap.ads)))
                               / len(tap.ads)), 3) for k in norms}
        rec = {"tag": a.tag, "q": q, **res, "gated_share": off, "s": round(time.time() - t0, 1)}
        with Path(a.out).open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    model.meft.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
