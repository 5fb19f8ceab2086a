"""Could per-row thresholds give the adapter an off state? `relu(k . x - b)` with b calibrated on background text.

An off state by design: each row fires only above a threshold b_i, set at a high quantile of its key's response
`k_i . x` over background tokens, so general text activates few rows while the training data, if it is unlike
the background, still activates many. This measures, before any training, whether the default model's FFN inputs
allow that with MEFT's frozen generated keys: for each adapted layer (the quick start's: every layer, 4,096 rows,
256 experts of 16, 4 experts per token, routed by the key-aligned initial gate), b_i = the q-quantile of k_i . x
over the calibration background (built-in world-fact questions about countries neither trained nor probed,
`meft.data.replay_prompts`, asked as the quick start asks); then, per token, "on" = any of its 64 routed rows
has k . x > b. Reported per token set, averaged over layers: the calibration set itself, more background
questions held out from calibration, the quick start's training questions, the known-fact probe (what the run
should keep) and the general prompts (what it should leave alone). Only the tokens after the chat template's
shared prefix count. A threshold separates only if the training questions are "on" far more often than the
probes. Nothing is trained; this is a measurement.

    python experiments/row_threshold.py --out experiments/results/row_threshold.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meft.adapter import init_gate, key_table  # noqa: E402
from meft.data import (  # noqa: E402
    GENERAL_PROMPTS,
    load_run_data,
    prompt_ids,
    replay_prompts,
    retention_records,
    with_system_prompt,  # noqa: E402
)
from meft.pretrained import load_model  # noqa: E402
from meft.train import TrainArgs  # noqa: E402

ROWS, EXPERT, PER_TOKEN = 4096, 16, 4
QUANTILES = (0.9, 0.99, 0.999)


def _ids(texts: list[str], tok, system) -> list[list[int]]:
    recs = with_system_prompt([{"prompt": t, "completion": "-"} for t in texts], system)
    return [prompt_ids(r, tok) for r in recs]


def _shared_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if len({r[i] for r in rows}) > 1:
            return i
    return n


@torch.no_grad()
def ffn_inputs(model, rows: list[list[int]], skip: int) -> dict[int, torch.Tensor]:
    """Every decoder layer's FFN input at the tokens after the shared prefix: {layer: [T, d]}."""
    layers = model.model.layers
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: got[i].append(a[0][0, skip:].float()))
             for i, layer in enumerate(layers)]
    try:
        for r in rows:
            model(input_ids=torch.tensor([r]))
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs) for i, xs in got.items()}


def routed_responses(x: torch.Tensor, keys: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k . x of each token's routed rows [T, k * S], their row ids [T, k * S]) for tokens x [T, d]."""
    experts = torch.topk(x @ gate.t(), PER_TOKEN, dim=1).indices  # [T, k]
    rows = (experts[:, :, None] * EXPERT + torch.arange(EXPERT)).reshape(x.shape[0], -1)  # [T, k * S]
    return (x @ keys.t()).gather(1, rows), rows  # [T, N] -> [T, k * S]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", type=int, default=200, help="background questions to calibrate on")
    ap.add_argument("--held-out", type=int, default=100, help="background questions held out from calibration")
    ap.add_argument("--train", type=int, default=100, help="training questions of the quick start")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model("default")
    data = load_run_data(TrainArgs(), tok, seed=0)
    system = data.system_prompt
    pool = [p["prompt"] for p in replay_prompts(a.calibration + a.held_out, exclude=data.train_subjects, seed=1)]
    sets = {"calibration": pool[: a.calibration], "background_held_out": pool[a.calibration:],
            "training_questions": [r["prompt"] for r in data.eval_splits["trained"][: a.train]],
            "known_fact_probe": [r["prompt"] for r in retention_records()],
            "general_prompts": list(GENERAL_PROMPTS)}
    ids = {k: _ids(v, tok, system) for k, v in sets.items()}
    skip = _shared_prefix([r for rows in ids.values() for r in rows])
    xs = {k: ffn_inputs(model, v, skip) for k, v in ids.items()}
    n_layers, d = len(model.model.layers), model.config.hidden_size
    shares = {q: {k: 0.0 for k in sets} for q in QUANTILES}
    for layer in range(n_layers):
        keys = key_table(ROWS, seed=0, layer=layer, d=d)  # [N, d] the quick start's frozen keys
        gate = init_gate(keys, EXPERT)  # [E, d]
        resp = xs["calibration"][layer] @ keys.t()  # [T_cal, N]
        b_all = torch.quantile(resp, torch.tensor(QUANTILES), dim=0)  # [Q, N] each row's threshold per quantile
        routed = {k: routed_responses(xs[k][layer], keys, gate) for k in sets}
        for qi, q in enumerate(QUANTILES):
            for k, (h, rows) in routed.items():
                on = (h > b_all[qi][rows]).any(dim=1)  # [T] any routed row above its threshold
                shares[q][k] += float(on.float().mean()) / n_layers
    out = {"model": "default (SmolLM2-135M-Instruct)", "rows": ROWS, "expert_size": EXPERT,
           "experts_per_token": PER_TOKEN, "tokens": {k: int(v[0].shape[0]) for k, v in xs.items()},
           "shared_prefix_tokens": skip, "on_share": {str(q): {k: round(v, 4) for k, v in s.items()}
                                                      for q, s in shares.items()},
           "seconds": round(time.time() - t0, 1)}
    for q, s in out["on_share"].items():
        print(f"q={q}: share of tokens with any routed row on: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
