"""Turn `--data` / `--eval-data` into what a training run needs: batches and evaluation splits.

`--data` is a record file (.jsonl, .json or .parquet, in any format of `meft.data.formats`) or a
built-in set (`world_facts`, `world_facts:N` for N countries,
`fictional_facts:N` for N facts). Built-in sets are scored on two splits: a seeded sample of the
trained questions ("trained") and the same facts asked with phrasings never trained on ("held_out").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from meft.data.builtin import BUILTIN_NAMES, load_builtin
from meft.data.files import SUFFIXES, load_records
from meft.data.formats import records_kind
from meft.data.records import BatchIterator, build_examples, uses_chat_template, with_system_prompt

__all__ = ["RunData", "load_run_data", "parse_data_spec", "resolve_system_prompt"]


@dataclass
class RunData:
    batches: BatchIterator                 # endless, resumable (epoch, index)
    eval_splits: dict[str, list[dict]]     # split name -> QA records to score
    description: str = ""                  # one line for the console: what was read, in which format
    system_prompt: str | None = None       # system message put into every conversation (None: template default)
    train_subjects: frozenset = frozenset()  # "subject" of every training record that has one (built-in sets)


def parse_data_spec(spec: str) -> tuple[str, dict]:
    """'world_facts:50' -> ('world_facts', {'max_countries': 50}); a record file -> ('file', {'path': ...})
    (a .jsonl, .json or .parquet file in any record format, read by `meft.data.files.load_records`)."""
    name, _, arg = spec.partition(":")
    if name in BUILTIN_NAMES:
        if not arg:
            return name, {}
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"--data {spec!r}: the part after ':' must be a positive integer, e.g. "
                             f"'{name}:100'")
        return name, {"max_countries" if name == "world_facts" else "n": int(arg)}
    if spec.lower().endswith(SUFFIXES) or Path(spec).exists():
        return "file", {"path": spec}
    raise ValueError(f"--data {spec!r}: not a record file ({', '.join(SUFFIXES)}) nor a built-in set; choose a "
                     f"file or one of {list(BUILTIN_NAMES)} (optionally with ':N')")


def resolve_system_prompt(value: str | None, tokenizer, *, builtin: bool) -> str | None:
    """`--system-prompt` -> the text `with_system_prompt` puts first (None: the chat template's own default).

    'auto' is '' (an empty system turn) for the built-in QA sets, whose questions are about 14 tokens: the
    default model's template would otherwise add its 20-token persona prompt to every example. For files it
    keeps the template's default, which is what the model sees in `meft generate`."""
    if value is None or value == "model":
        return None
    if not uses_chat_template(tokenizer):
        if value == "auto":
            return None
        raise ValueError(f"--system-prompt {value!r}: this tokenizer has no chat template, so there is no system "
                         "message to set; fix: drop --system-prompt (or put the text into the prompts)")
    if value == "auto":
        return "" if builtin else None
    return value


def _sample(records: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or limit >= len(records):
        return list(records)
    return random.Random(seed).sample(records, limit)


def load_run_data(args, tokenizer, *, seed: int, extra_records: list[dict] | None = None) -> RunData:
    """Build the training batches and the evaluation splits for `args` (a TrainArgs); `extra_records`
    (QA records, e.g. `meft.data.replay`'s) join the training records."""
    kind, kw = parse_data_spec(args.data)
    system = resolve_system_prompt(getattr(args, "system_prompt", "model"), tokenizer, builtin=kind != "file")
    if kind == "file":
        train_records = load_records(kw["path"])
        what = f"{len(train_records)} {train_records[0]['_format']} records from {kw['path']}"
        evals = {}
        if args.eval_data:
            eval_records = load_records(args.eval_data)
            if records_kind(eval_records) != "qa":
                raise ValueError(f"--eval-data {args.eval_data!r} holds text records; it must hold QA records "
                                 "(prompt/completion, messages, ShareGPT or Alpaca)")
            evals["eval"] = _sample(eval_records, args.eval_limit, seed)
    else:
        facts = load_builtin(kind, **kw, seed=seed)
        train_records = facts.train
        what = f"{len(train_records)} built-in {args.data} records"
        evals = {"trained": _sample(facts.train, args.eval_limit, seed),
                 "held_out": _sample(facts.eval, args.eval_limit, seed)}
        if args.eval_data:
            evals = {"eval": _sample(load_records(args.eval_data), args.eval_limit, seed)}
    subjects = frozenset(r["subject"] for r in train_records if "subject" in r)
    if extra_records:
        if records_kind(train_records) != "qa":
            raise ValueError(f"--data {args.data!r} holds text records; replayed QA records cannot join them; "
                             "fix: --replay 0")
        train_records = list(train_records) + list(extra_records)
        what += f" + {len(extra_records)} replayed"
    if records_kind(train_records) == "qa":
        train_records = with_system_prompt(train_records, system)
    evals = {split: with_system_prompt(recs, system) for split, recs in evals.items()}
    examples = build_examples(train_records, tokenizer, max_length=args.max_length, block_size=args.block_size)
    batches = BatchIterator(examples, args.batch_size, tokenizer.pad_token_id, seed=seed,
                            group_by_length=getattr(args, "group_by_length", False))
    if system is not None:
        what += f", system prompt {system!r}"
    return RunData(batches=batches, eval_splits=evals, description=f"meft: data: {what}", system_prompt=system,
                   train_subjects=subjects)
