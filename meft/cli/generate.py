"""`meft generate`: answer prompts with a base model, or base + adapter (chat template for instruct models)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meft.cli.eval import FORCE_BASE_HELP, SYSTEM_PROMPT_HELP, load_scored_model, scoring_system_prompt
from meft.cli.options import add_command, resolve_options
from meft.data.records import prompt_ids, with_system_prompt
from meft.evaluate import generate_answers
from meft.option_field import opt

__all__ = ["add_parser", "run", "GenerateArgs"]



@dataclass
class GenerateArgs:
    model: str = opt("default", "Base model: 'default' (SmolLM2-135M-Instruct), a local HF folder or a hub id.")
    adapter: str | None = opt(None, "Adapter folder (run_dir/adapter of `meft train`); omit for the base model.")
    prompt_file: str | None = opt(None, "A text file with one prompt per line (in addition to PROMPT args).")
    max_new_tokens: int = opt(64, "Tokens generated per answer (greedy decoding).")
    batch_size: int = opt(8, "Prompts answered together.")
    system_prompt: str = opt("auto", SYSTEM_PROMPT_HELP)
    force_base: bool = opt(False, FORCE_BASE_HELP)


def add_parser(sub) -> None:
    p = add_command(sub, "generate", help="answer prompts with a model (or model + adapter)", description=__doc__,
                    epilog='example:\n  meft generate --adapter runs/meft/adapter "What is the capital of Peru?"',
                    run=run, groups=[(GenerateArgs, "generate")])
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to answer")


def run(args: argparse.Namespace) -> int:
    (ga,) = resolve_options(args, [GenerateArgs])
    prompts = list(args.prompts)
    if ga.prompt_file:
        with open(ga.prompt_file) as fh:
            prompts += [line.strip() for line in fh if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass them as arguments or with --prompt-file FILE")
    model, tokenizer = load_scored_model(ga.model, ga.adapter, force_base=ga.force_base)
    system = scoring_system_prompt(ga.system_prompt, ga.adapter, tokenizer, builtin=False)
    records = with_system_prompt([{"prompt": p, "completion": "-"} for p in prompts], system)
    ids = [prompt_ids(r, tokenizer) for r in records]
    answers = generate_answers(model, tokenizer, ids, batch_size=ga.batch_size, max_new_tokens=ga.max_new_tokens)
    for p, a in zip(prompts, answers):
        print(f"> {p}\n{a}\n")
    if getattr(model, "meft", None) is not None:
        model.meft.close()
    return 0
