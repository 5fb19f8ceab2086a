"""Turn `--data` / `--eval-data` into what a training run needs: batches and evaluation splits.

`--data` is a .jsonl path or a built-in set (`world_facts`, `world_facts:N` for N countries,
`fictional_facts:N` for N facts). Built-in sets are scored on two splits: a seeded sample of the
trained questions ("trained") and the same facts asked with phrasings never trained on ("held_out").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from meft.data.builtin import BUILTIN_NAMES, load_builtin
from meft.data.records import BatchIterator, build_examples, load_jsonl, records_kind

__all__ = ["RunData", "load_run_data", "parse_data_spec"]


@dataclass
class RunData:
    batches: BatchIterator                 # endless, resumable (epoch, index)
    eval_splits: dict[str, list[dict]]     # split name -> QA records to score


def parse_data_spec(spec: str) -> tuple[str, dict]:
    """'world_facts:50' -> ('world_facts', {'max_countries': 50}); a path -> ('jsonl', {'path': ...})."""
    name, _, arg = spec.partition(":")
    if name in BUILTIN_NAMES:
        if not arg:
            return name, {}
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"--data {spec!r}: the part after ':' must be a positive integer, e.g. "
                             f"'{name}:100'")
        return name, {"max_countries" if name == "world_facts" else "n": int(arg)}
    if spec.endswith(".jsonl") or Path(spec).exists():
        return "jsonl", {"path": spec}
    raise ValueError(f"--data {spec!r}: not a .jsonl file nor a built-in set; choose a .jsonl path or one of "
                     f"{list(BUILTIN_NAMES)} (optionally with ':N')")


def _sample(records: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or limit >= len(records):
        return list(records)
    return random.Random(seed).sample(records, limit)


def load_run_data(args, tokenizer, *, seed: int) -> RunData:
    """Build the training batches and the evaluation splits for `args` (a TrainArgs)."""
    kind, kw = parse_data_spec(args.data)
    if kind == "jsonl":
        train_records = load_jsonl(kw["path"])
        evals = {}
        if args.eval_data:
            eval_records = load_jsonl(args.eval_data)
            if records_kind(eval_records) != "qa":
                raise ValueError(f"--eval-data {args.eval_data!r} holds text records; it must hold QA records "
                                 "({prompt, completion} or {messages})")
            evals["eval"] = _sample(eval_records, args.eval_limit, seed)
    else:
        facts = load_builtin(kind, **kw, seed=seed)
        train_records = facts.train
        evals = {"trained": _sample(facts.train, args.eval_limit, seed),
                 "held_out": _sample(facts.eval, args.eval_limit, seed)}
        if args.eval_data:
            evals = {"eval": _sample(load_jsonl(args.eval_data), args.eval_limit, seed)}
    examples = build_examples(train_records, tokenizer, max_length=args.max_length, block_size=args.block_size)
    batches = BatchIterator(examples, args.batch_size, tokenizer.pad_token_id, seed=seed)
    return RunData(batches=batches, eval_splits=evals)
