"""Where a trained adapter's learning and forgetting live: by layer range and by position.

Loads the default model with a `meft train` adapter and scores the three sets of the quick start's summary --
trained exact match (64 training questions), held-out exact match (64 unseen phrasings of the trained facts) and
known facts kept (`meft.data.retention`, 30 facts the base model knows, contains match) -- with the adapter
switched on only in parts of the model:

* layer ranges: every adapted layer, or only the layers of one range (`--ranges`, e.g. 0-9 10-19 20-29);
* positions: everywhere, only while the prompt is read (the prefill forward of generation), or only while the
  answer is written (the decoding forwards: the prompt's hidden states, and so its KV cache, are the base
  model's).

`--sentence` adds one more line: the known facts asked with the base model's own sentence up to the answer
already written ("The capital of Iran is" ...), with the adapter everywhere and nowhere: whether the fact is
still there when the model is not asked to answer in the trained short form.

The adapter is switched with `SparseFFNAdapter.enabled`; nothing is trained here. One JSON line per variant is
appended to --out (resumable), and a table is printed.

    python experiments/forgetting_anatomy.py --adapter runs/meft/adapter --out experiments/results/anatomy.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meft.adapter import load_adapter
from meft.data import RETENTION_MAX_NEW_TOKENS, load_run_data, prompt_ids, retention_records, with_system_prompt
from meft.evaluate import contains_match, generate_answers, qa_accuracy
from meft.pretrained import load_model
from meft.train import TrainArgs

POSITIONS = ("all", "prompt", "answer")


def _parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def _switch(model, layers: tuple[int, int] | None, positions: str):
    """Enable the adapters of `layers` (inclusive range of decoder-layer indices; None = all) and, with
    `positions` 'prompt' / 'answer', only in the prefill / decoding forwards. Returns the hook handle."""
    ads = model.meft.adapters
    in_range = [layers is None or layers[0] <= ad.layer <= layers[1] for ad in ads]

    def pre(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        prefill = ids is None or ids.shape[1] > 1  # generation feeds one token per decoding forward
        on = positions == "all" or (positions == "prompt") == prefill
        for ad, r in zip(ads, in_range):
            ad.enabled = r and on

    return model.register_forward_pre_hook(pre, with_kwargs=True)


def _set_enabled(model, on: bool) -> None:
    for ad in model.meft.adapters:
        ad.enabled = on


def sentence_prefix_kept(model, tok, records: list[dict]) -> dict:
    """Known facts asked with the base model's answer written up to the fact: {"n", "base", "adapted"} (% whose
    continuation contains the answer). Facts whose base answer does not spell the answer verbatim after some text
    (no prefix to give) are left out."""
    _set_enabled(model, False)
    with torch.no_grad():
        base = generate_answers(model, tok, [prompt_ids(r, tok) for r in records], batch_size=32,
                                max_new_tokens=RETENTION_MAX_NEW_TOKENS)
    prompts, answers = [], []
    for rec, text in zip(records, base):
        at = min((text.find(a) for a in rec["answers"] if a in text), default=-1)
        if at > 0:
            prompts.append(prompt_ids(rec, tok) + tok(text[:at].rstrip(), add_special_tokens=False)["input_ids"])
            answers.append(rec["answers"])
    out = {"n": len(prompts)}
    for label, on in (("base", False), ("adapted", True)):
        _set_enabled(model, on)
        with torch.no_grad():
            cont = generate_answers(model, tok, prompts, batch_size=32, max_new_tokens=8)
        out[label] = round(100 * sum(contains_match(c, a) for c, a in zip(cont, answers)) / max(1, len(prompts)), 1)
    _set_enabled(model, True)
    return out


def score(model, tok, sets: dict) -> dict:
    out = {}
    for name, (records, max_new, key) in sets.items():
        # one prefill per prompt (no shared prefix): the position switch sees the whole prompt in one forward
        res = qa_accuracy(model, tok, records, batch_size=32, max_new_tokens=max_new, share_prefix=False)
        out[name] = round(100 * res[key], 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder of a `meft train` run (run_dir/adapter)")
    ap.add_argument("--out", required=True, help="results file (JSON lines), appended to and resumed from")
    ap.add_argument("--ranges", nargs="*", default=["0-9", "10-19", "20-29"],
                    help="decoder-layer ranges scored on their own (inclusive, e.g. 0-9)")
    ap.add_argument("--tag", default="", help="label stored with each line (e.g. the run's settings)")
    ap.add_argument("--sentence", action="store_true", help="also score the known facts after the base model's "
                    "own sentence prefix (see the module docstring)")
    ap.add_argument("--model", default="default", help="the base model the adapter was trained on")
    ap.add_argument("--eval-limit", type=int, default=64, help="questions per trained / held-out set (the quick "
                    "start's 64)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    args = TrainArgs(eval_limit=a.eval_limit)
    data = load_run_data(args, tok, seed=0)  # the quick start's scoring sets (seed 0)
    sets = {"trained": (data.eval_splits["trained"], args.max_new_tokens, "exact_match"),
            "held_out": (data.eval_splits["held_out"], args.max_new_tokens, "exact_match"),
            "kept": (with_system_prompt(retention_records(), data.system_prompt), RETENTION_MAX_NEW_TOKENS, "contains")}
    load_adapter(model, a.adapter, verbose=False)
    model.eval()
    done = set()
    out = Path(a.out)
    if out.exists():
        done = {(r["tag"], r["layers"], r["positions"]) for r in map(json.loads, out.read_text().splitlines())}
    variants = [("none", "all")] + [("all", p) for p in POSITIONS] + [(r, "all") for r in a.ranges]
    for layers, positions in variants:
        if (a.tag, layers, positions) in done:
            continue
        t0 = time.time()
        if layers == "none":
            handle = None
            _set_enabled(model, False)
        else:
            handle = _switch(model, None if layers == "all" else _parse_range(layers), positions)
        try:
            res = score(model, tok, sets)
        finally:
            if handle is not None:
                handle.remove()
            _set_enabled(model, True)
        rec = {"tag": a.tag, "layers": layers, "positions": positions, **res, "s": round(time.time() - t0, 1)}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{a.tag:>12} layers {layers:>6} positions {positions:>7}: trained {res['trained']:5.1f}  "
              f"held-out {res['held_out']:5.1f}  kept {res['kept']:5.1f}  ({rec['s']} s)", flush=True)
    if a.sentence and (a.tag, "all", "sentence-prefix") not in done:
        res = sentence_prefix_kept(model, tok, sets["kept"][0])
        rec = {"tag": a.tag, "layers": "all", "positions": "sentence-prefix", **res}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{a.tag:>12} known facts after the base model's sentence prefix (n={res['n']}): base {res['base']}, "
              f"adapted {res['adapted']}", flush=True)
    model.meft.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
