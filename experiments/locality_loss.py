"""Does a locality loss make room for an off state? The quick start trained with background questions in every
batch whose adapter output is pushed towards zero, against the same loop without it.

A locality loss in the spirit of WISE (arXiv 2405.14768): every training batch also carries `--background`
questions the run does not teach (built-in world-fact questions about countries in neither the training data
nor the trade-off probe, `meft.data.replay_prompts`, asked as the quick start asks), with no labels. Their
tokens add `lam * mean ||delta h||^2` (over their real tokens, averaged over adapted layers) to the loss, so
rows that fire on inputs the run does not teach learn to stay silent there, while the language-model loss
teaches the facts. `--lam 0` is the same loop without the term (the control: padded batches with the
background rows in them, so both see the same tokens and the same row budget). Then it scores what the quick
start's summary shows: trained / held-out exact match, known facts kept (`meft.data.retention`, contains) and
general-prompt agreement with the base model (`meft.general_agreement`). One JSON line per (lam, seed) is
appended to --out (resumable). Nothing here changes meft's defaults; this is a measurement.

    python experiments/locality_loss.py --lam 0 0.1 --out experiments/results/locality_loss.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import meft
from meft import general_agreement, general_reference
from meft.data import (
    RETENTION_MAX_NEW_TOKENS,
    load_run_data,
    prompt_ids,
    replay_prompts,
    retention_records,
    with_system_prompt,
)
from meft.evaluate import qa_accuracy
from meft.pretrained import load_model
from meft.train import TrainArgs


def _pad(batch: dict, width: int, pad_id: int) -> dict:
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=pads[k]) for k, v in batch.items()}


def _background_batch(rows: list[list[int]], pad_id: int) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [K, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)       # [K, T]
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100)}


def run(lam: float, seed: int, n_bg: int, steps: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    model, tok = load_model("default")
    args = TrainArgs(packing="off")
    data = load_run_data(args, tok, seed=seed)
    system = data.system_prompt
    ref = general_reference(model, tok, system_prompt=system)
    pool = replay_prompts(400, exclude=data.train_subjects, seed=1)  # neither trained nor probed
    bg_rows = [prompt_ids(r, tok) for r in with_system_prompt([{"prompt": p["prompt"], "completion": "-"}
                                                               for p in pool], system)]
    meft.wrap(model, meft.MeftConfig(seed=seed))
    rt = model.meft
    outs: list[torch.Tensor] = []

    def tap(fn):
        def delta(x, *a):
            y = fn(x, *a)  # [B, T, d]
            if model.training:
                outs.append(y)
            return y
        return delta

    for ad in rt.adapters:
        ad._delta = tap(ad._delta)
    sched = torch.optim.lr_scheduler.LambdaLR(rt.optimizer, lambda s: min(1.0, (s + 1) / 6))
    rng = random.Random(seed)
    model.train()
    t0, losses = time.time(), []
    for _ in range(steps):
        batch = next(data.batches)
        bg = _background_batch(rng.sample(bg_rows, n_bg), tok.pad_token_id)
        width = max(batch["input_ids"].shape[1], bg["input_ids"].shape[1])
        batch, bg = _pad(batch, width, tok.pad_token_id), _pad(bg, width, tok.pad_token_id)
        full = {k: torch.cat([batch[k], bg[k]]) for k in batch}
        outs.clear()
        lm = model(**full).loss
        bg_mask = full["attention_mask"][-n_bg:].bool()  # [K, T] real background tokens
        local = torch.stack([y[-n_bg:].float().pow(2).sum(-1)[bg_mask].mean() for y in outs]).mean()
        (lm + lam * local).backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        sched.step()
        losses.append((round(lm.item(), 4), round(local.item(), 4)))
    train_s = time.time() - t0
    model.eval()
    res = {}
    for name in ("trained", "held_out"):
        res[name] = round(100 * qa_accuracy(model, tok, data.eval_splits[name], batch_size=32,
                                            max_new_tokens=args.max_new_tokens)["exact_match"], 1)
    kept = qa_accuracy(model, tok, with_system_prompt(retention_records(), system), batch_size=32,
                       max_new_tokens=RETENTION_MAX_NEW_TOKENS)
    res["kept"] = round(100 * kept["contains"], 1)
    res["agreement"] = round(general_agreement(model, ref)["agreement"], 4)
    rt.close()
    return {"lam": lam, "seed": seed, "background_per_batch": n_bg, "steps": steps, **res,
            "first_last_loss": [losses[0], losses[-1]], "train_s": round(train_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.1], help="weights of the locality term")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--background", type=int, default=4, help="background questions per batch")
    ap.add_argument("--steps", type=int, default=76, help="optimizer steps (the quick start's 76)")
    ap.add_argument("--out", required=True, help="results file (JSON lines), appended to and resumed from")
    a = ap.parse_args(argv)
    out = Path(a.out)
    done = {(r["lam"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    for seed in a.seeds:
        for lam in a.lam:
            if (lam, seed) in done:
                continue
            rec = run(lam, seed, a.background, a.steps)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
