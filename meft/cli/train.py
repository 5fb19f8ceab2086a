"""`meft train`: fine-tune a model with a MEFT adapter (defaults: SmolLM2-135M-Instruct, world facts)."""

from __future__ import annotations

import argparse

from meft.cli.options import add_command, resolve_options
from meft.config import MeftConfig
from meft.train.args import TrainArgs
from meft.train.loop import train

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  meft train                                   # default model, built-in world facts, before/after accuracy
  meft train --data fictional_facts:2000 --steps 300 --adapter-rows 32768
  meft train --data my.jsonl --model ./my-hf-folder --backbone lomo --backbone-lr 1e-5
  meft train --config run.yaml --resume        # continue the run in output_dir exactly
"""


def add_parser(sub) -> None:
    add_command(sub, "train", help="fine-tune with a sparse adapter held in CPU memory", description=__doc__,
                epilog=EPILOG, run=run, groups=[(TrainArgs, "run"), (MeftConfig, "adapter (MeftConfig)")])


def run(args: argparse.Namespace) -> int:
    targs, cfg = resolve_options(args, [TrainArgs, MeftConfig])
    args.debug = targs.debug
    summary = train(targs, cfg)
    return 130 if summary["interrupted"] else 0
