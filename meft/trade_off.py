"""What fine-tuning kept and what it lost: the trade-off probe `meft train` runs before and after training.

Owns `trade_off_probe` (a model's answers to the built-in retention set of `meft.data.retention`, facts the
default model knows that are not in the quick start's training data, its greedy answers to the free
prompts, and its agreement with the base model on general prompts, `meft.agreement`), `trade_off_summary`
(two probes, base and fine-tuned, side by side: the ``trade_off`` entry of a run's summary.json), and the
set's upkeep: `verify_retention_set` (which questions a model answers), `build_retention_set` (how the set
was chosen: per relation, the first candidates in seeded order that the model answers, contains match).
`python -m meft.trade_off` re-verifies the set on the default model
(exit 1 if any question is no longer answered); `--build` prints a freshly chosen set as Python.
"""

from __future__ import annotations

import argparse

import torch

from meft.agreement import general_agreement, general_reference
from meft.data.records import prompt_ids, with_system_prompt
from meft.data.retention import (
    FREE_MAX_NEW_TOKENS,
    FREE_PROMPTS,
    RETENTION_MAX_NEW_TOKENS,
    RETENTION_QUOTA,
    RETENTION_SYSTEM_PROMPT,
    retention_candidates,
    retention_phrasing_records,
    retention_records,
)
from meft.evaluate import generate_answers, qa_accuracy
from meft.pretrained import load_model

__all__ = ["trade_off_probe", "trade_off_summary", "verify_retention_set", "build_retention_set", "main"]


def trade_off_probe(model, tokenizer, *, retention: bool = True, generations: bool = True, general: bool = False,
                    reference: dict | None = None, batch_size: int = 32, system_prompt: str | None = None) -> dict:
    """What a model knows and how it writes, to compare before and after fine-tuning (`meft.data.retention`).

    Returns ``{"retention": {"exact_match", "contains", "n", "items": [{"prompt", "answers", "prediction",
    "contains"}]}, "generations": [{"prompt", "answer"}]}`` (a part left out is absent): the built-in
    retention set scored with its token budget, and greedy answers to `FREE_PROMPTS`, each one batch.
    `system_prompt`: the system message of every question (`with_system_prompt`; None = the template's).
    `general`: also the general-prompt agreement (`meft.agreement`): without `reference` this model is the
    base and its continuations become the reference (``{"general": {"reference": ...}}``); with the base
    probe's ``general["reference"]`` this model's agreement with it (``{"general": {"agreement", ...}}``)."""
    out: dict = {}
    if general:
        if reference is None:
            out["general"] = {"reference": general_reference(model, tokenizer, system_prompt=system_prompt,
                                                             batch_size=batch_size)}
        else:
            out["general"] = general_agreement(model, reference, batch_size=batch_size)
    if retention:
        records = with_system_prompt(retention_records(), system_prompt)
        res = qa_accuracy(model, tokenizer, records, batch_size=batch_size, max_new_tokens=RETENTION_MAX_NEW_TOKENS,
                          chat=None)
        out["retention"] = {"exact_match": res["exact_match"], "contains": res["contains"], "n": res["n"],
                            "items": [{k: i[k] for k in ("prompt", "answers", "prediction", "contains")}
                                      for i in res["items"]]}
    if generations:
        recs = with_system_prompt([{"prompt": p, "completion": "-"} for p in FREE_PROMPTS], system_prompt)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                answers = generate_answers(model, tokenizer, [prompt_ids(r, tokenizer) for r in recs],
                                           batch_size=batch_size, max_new_tokens=FREE_MAX_NEW_TOKENS)
        finally:
            model.train(was_training)
        out["generations"] = [{"prompt": p, "answer": a} for p, a in zip(FREE_PROMPTS, answers)]
    return out


def trade_off_summary(before: dict, after: dict) -> dict:
    """Two `trade_off_probe` results (base, fine-tuned) -> the summary's ``trade_off`` entry:
    ``{"retention": {"before", "after" (contains rates), "exact_match_before", "exact_match_after", "n",
    "kept" (share of the facts answered before that are still answered after), "lost": [prompts],
    "items": [{"prompt", "answers", "before", "after"}]}, "generations": [{"prompt", "base", "tuned"}],
    "general": {"agreement", "n_prompts", "n_tokens", "per_prompt": [{"prompt", "agreement"}]}}``."""
    out: dict = {}
    if "general" in before and "agreement" in after.get("general", {}):
        g = after["general"]
        out["general"] = {"agreement": g["agreement"], "n_prompts": g["n_prompts"], "n_tokens": g["n_tokens"],
                          "per_prompt": [{"prompt": p, "agreement": a}
                                         for p, a in zip(before["general"]["reference"]["prompts"], g["per_prompt"])]}
    if "retention" in before and "retention" in after:
        b, a = before["retention"], after["retention"]
        known = [(x, y) for x, y in zip(b["items"], a["items"]) if x["contains"]]
        out["retention"] = {
            "before": b["contains"], "after": a["contains"], "exact_match_before": b["exact_match"],
            "exact_match_after": a["exact_match"], "n": b["n"],
            "kept": sum(y["contains"] for _, y in known) / len(known) if known else None,
            "lost": [x["prompt"] for x, y in known if not y["contains"]],
            "items": [{"prompt": x["prompt"], "answers": x["answers"], "before": x["prediction"],
                       "after": y["prediction"]} for x, y in zip(b["items"], a["items"])]}
    if "generations" in before and "generations" in after:
        out["generations"] = [{"prompt": x["prompt"], "base": x["answer"], "tuned": y["answer"]}
                              for x, y in zip(before["generations"], after["generations"])]
    return out


def verify_retention_set(model, tokenizer, records: list[dict] | None = None, *, batch_size: int = 32,
                         system_prompt: str | None = RETENTION_SYSTEM_PROMPT) -> dict:
    """Score `records` (default: every phrasing of the built-in set's facts) as the trade-off probe scores
    its questions; `qa_accuracy`'s result."""
    records = records if records is not None else retention_phrasing_records()
    return qa_accuracy(model, tokenizer, with_system_prompt(records, system_prompt), batch_size=batch_size,
                       max_new_tokens=RETENTION_MAX_NEW_TOKENS, chat=True)


def build_retention_set(model, tokenizer, *, seed: int = 0, batch_size: int = 32,
                        system_prompt: str | None = RETENTION_SYSTEM_PROMPT) -> list[tuple]:
    """Choose a set as `RETENTION_QUESTIONS` was chosen: candidates in seeded order, a batch at a time,
    keeping per relation the first facts `model` answers (contains) under every one of their phrasings
    until `RETENTION_QUOTA` is met."""
    need, kept = dict(RETENTION_QUOTA), []
    pending = retention_candidates(seed)
    while pending and any(need.values()):
        batch = [r for r in pending if need[r["relation"]] > 0][:batch_size]
        if not batch:
            break
        pending = [r for r in pending if r not in batch]
        asked = [p for rec in batch for p in rec["phrasings"]]
        scored = iter(verify_retention_set(model, tokenizer, asked, system_prompt=system_prompt)["items"])
        for rec in batch:
            known = all([next(scored)["contains"] for _ in rec["phrasings"]])  # consume every phrasing's item
            if known and need[rec["relation"]] > 0:
                need[rec["relation"]] -= 1
                kept.append((rec["prompt"], tuple(rec["answers"]), rec["relation"], rec["subject"]))
    if any(need.values()):
        raise ValueError(f"the model knows too few candidate facts: still missing {need}")
    order = {rel: i for i, rel in enumerate(RETENTION_QUOTA)}
    return sorted(kept, key=lambda q: order[q[2]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meft.trade_off", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model to verify (default: the default model)")
    p.add_argument("--build", action="store_true", help="choose a fresh set and print it as Python")
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    if args.build:
        print("RETENTION_QUESTIONS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (")
        for q in build_retention_set(model, tok):
            print(f"    {q!r},")
        print(")")
        return 0
    res = verify_retention_set(model, tok)
    missed = [i for i in res["items"] if not i["contains"]]
    for i in missed:
        print(f"not answered: {i['prompt']!r} -> {i['prediction']!r} (expected {i['answers']})")
    print(f"retention set: {res['n'] - len(missed)}/{res['n']} phrasings of its {len(retention_records())} facts "
          f"answered (contains) by {args.model}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
