"""`meft profile`: N training steps of a `meft train` setup under the TrafficMeter; JSON, trace, PNG."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from meft.cli.options import add_command, resolve_options
from meft.config import MeftConfig
from meft.profile.run import profile
from meft.train.args import TrainArgs

__all__ = ["add_parser", "run", "ProfileOptions"]

EPILOG = """Takes every option of `meft train` (--steps is the number of profiled steps, default 5; output
goes to --output-dir: profile.json, trace.json for ui.perfetto.dev, profile.png).

examples:
  meft profile --steps 5 --output-dir runs/profile
  meft profile --model ./my-hf-folder --data my.jsonl --link pcie4
  meft profile --link 20 --compute-ms-per-layer 3.5     # predict with a given GPU compute time
"""


@dataclass
class ProfileOptions:
    link: str | None = field(default=None, metadata={"help": "Predict exposed transfer time on this link: "
                             "pcie3 (12 GB/s), pcie4 (25), pcie5 (50) or a number in GB/s. A prediction, "
                             "labelled as such."})
    compute_ms_per_layer: float | None = field(default=None, metadata={
        "help": "Compute ms per layer per step (forward + backward) for --link; default: measured here."})
    link_latency_us: float = field(default=10.0, metadata={
        "help": "Fixed cost of each copy for --link (launch, DMA setup, completion), in microseconds: every "
                "layer pays it per copy on top of bytes / bandwidth."})


def add_parser(sub) -> None:
    add_command(sub, "profile", help="profile PCIe traffic, CPU updates and compute of a few training steps",
                description=__doc__, epilog=EPILOG, run=run,
                groups=[(ProfileOptions, "profile"), (TrainArgs, "run (as meft train)"),
                        (MeftConfig, "adapter (MeftConfig)")])


def run(args: argparse.Namespace) -> int:
    popts, targs, cfg = resolve_options(args, [ProfileOptions, TrainArgs, MeftConfig])
    args.debug = targs.debug
    if args.output_dir is None:
        targs.output_dir = "runs/profile"
    profile(targs, cfg, link=popts.link, compute_ms_per_layer=popts.compute_ms_per_layer,
            link_latency_us=popts.link_latency_us)
    return 0
