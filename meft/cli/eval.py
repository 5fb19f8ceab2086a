"""`meft eval`: exact-match / contains accuracy on QA data, perplexity on text data, base or base+adapter."""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from meft.adapter.saving import adapter_training_info, load_adapter
from meft.cli.options import add_command, resolve_options
from meft.data.builtin import load_builtin
from meft.data.files import load_records
from meft.data.records import records_kind, with_system_prompt
from meft.data.sources import parse_data_spec, resolve_system_prompt
from meft.evaluate import perplexity, qa_accuracy
from meft.option_field import opt
from meft.pretrained import load_model
from offload.text import format_table

__all__ = ["add_parser", "run", "EvalArgs", "load_scored_model", "scoring_system_prompt", "SYSTEM_PROMPT_HELP",
           "FORCE_BASE_HELP"]

FORCE_BASE_HELP = ("Load --adapter even onto a base model other than the one it was trained on (the adapter "
                   "folder records its base model's name and hashes; a mismatch is refused without this).")
SYSTEM_PROMPT_HELP = ("System message put first in every prompt (chat models): 'auto' = the one the adapter was "
                      "trained with (its adapter_config.json records it), else what `meft train` uses (an empty one "
                      "for the built-in sets, the chat template's default otherwise); 'model' = the template's "
                      "default; any other text = that message.")


@dataclass
class EvalArgs:
    model: str = opt("default", "Base model: 'default' (SmolLM2-135M-Instruct), a local HF folder or a hub id.")
    adapter: str | None = opt(None, "Adapter folder written by `meft train` (run_dir/adapter) or "
                             "meft.save_adapter; omit to score the base model.")
    data: str = opt("world_facts:50", "QA or text data: a .jsonl, .json or .parquet file in any record format "
                   "`meft train` reads, or a built-in set (as in `meft train`). QA records are scored by greedy "
                   "decoding; {text} records by perplexity.")
    split: str = opt("held_out", "For built-in sets: 'trained' (training phrasings) or 'held_out' "
                    "(same facts, phrasings never trained on).")
    limit: int = opt(0, "Score at most this many records (0 = all); a seeded sample.")
    batch_size: int = opt(32, "Prompts (or text windows) per batch.")
    max_new_tokens: int = opt(12, "Tokens generated per answer.")
    max_length: int = opt(512, "Window length for perplexity.")
    seed: int = opt(0, "Seed of the built-in data and of the sample.")
    system_prompt: str = opt("auto", SYSTEM_PROMPT_HELP)
    force_base: bool = opt(False, FORCE_BASE_HELP)
    json_out: str | None = opt(None, "Also write the full result (with every prediction) to this JSON file.")
    progress: bool = opt(True, "Show a progress bar.")


def add_parser(sub) -> None:
    add_command(sub, "eval", help="score a model (or model + adapter) on QA or text data", description=__doc__,
                epilog="examples:\n  meft eval --adapter runs/meft/adapter\n"
                       "  meft eval --data facts.jsonl --limit 200\n"
                       "  meft eval --data alpaca.json --limit 200\n"
                       "  meft eval --data corpus.parquet  # {text} records: perplexity",
                run=run, groups=[(EvalArgs, "eval")])


def load_scored_model(model_arg: str, adapter: str | None, *, force_base: bool = False):
    """(model, tokenizer) for scoring: the base model, wrapped with `adapter` when given (`force_base`: even
    when the adapter records another base model)."""
    if adapter is not None and not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter {adapter!r}: no such folder; pass run_dir/adapter of a `meft train` run")
    model, tokenizer = load_model(model_arg)
    if adapter is not None:
        load_adapter(model, adapter, force=force_base)
    return model.eval(), tokenizer


def scoring_system_prompt(value: str, adapter: str | None, tokenizer, *, builtin: bool) -> str | None:
    """`--system-prompt` of `meft eval` / `meft generate` -> the system message to use (None: the template's)."""
    if value == "auto" and adapter is not None:
        value = adapter_training_info(adapter).get("system_prompt", value)
    return resolve_system_prompt(value, tokenizer, builtin=builtin)


def _records(args: EvalArgs) -> tuple[str, list[dict]]:
    kind, kw = parse_data_spec(args.data)
    if kind == "file":
        records = load_records(kw["path"])
    else:
        if args.split not in ("trained", "held_out"):
            raise ValueError(f"--split {args.split!r}: choose 'trained' or 'held_out'")
        facts = load_builtin(kind, **kw, seed=args.seed)
        records = facts.train if args.split == "trained" else facts.eval
    if args.limit and args.limit < len(records):
        records = random.Random(args.seed).sample(records, args.limit)
    return records_kind(records), records


def run(args: argparse.Namespace) -> int:
    (ea,) = resolve_options(args, [EvalArgs])
    kind, records = _records(ea)
    model, tokenizer = load_scored_model(ea.model, ea.adapter, force_base=ea.force_base)
    if kind != "text":
        builtin = parse_data_spec(ea.data)[0] != "file"
        records = with_system_prompt(records, scoring_system_prompt(ea.system_prompt, ea.adapter, tokenizer,
                                                                    builtin=builtin))
    who = f"{ea.model}" + (f" + {ea.adapter}" if ea.adapter else "")
    if kind == "text":
        res = perplexity(model, tokenizer, [r["text"] for r in records], batch_size=ea.batch_size,
                         max_length=ea.max_length, progress=ea.progress)
        print(format_table([[who, res["n_tokens"], round(res["loss"], 4), round(res["perplexity"], 3)]],
                           ["model", "tokens", "loss (nats)", "perplexity"]))
    else:
        res = qa_accuracy(model, tokenizer, records, batch_size=ea.batch_size,
                          max_new_tokens=ea.max_new_tokens, progress=ea.progress)
        print(format_table([[who, res["n"], f"{res['exact_match']:.1%}", f"{res['contains']:.1%}"]],
                           ["model", "records", "exact match", "contains"]))
    if ea.json_out:
        with open(ea.json_out, "w") as fh:
            json.dump(res, fh, indent=2)
    if getattr(model, "meft", None) is not None:
        model.meft.close()
    return 0
