"""`meft plan`: will a wrapped training step fit the GPU? Fake-tensor estimate, nothing allocated."""

from __future__ import annotations

import argparse
import json

from meft.cli.options import add_command, resolve_options
from meft.config import MeftConfig
from meft.plan.planner import PlanOptions, format_plan, plan

__all__ = ["add_parser", "run"]

EPILOG = """The estimate runs one training step (forward, backward, optimizer step) of the model built from its
config inside FakeTensorMode on fake CPU tensors, under torch's MemTracker, with the adapter step built
from the adapter options alone (no host store is allocated). Margins for the CUDA context and the
caching allocator are added and stated. Host RAM is the RowStores' bytes + staging + pending grads.

Data parallel under torchrun: --gpus N (GPUs per node, torchrun --nproc_per_node) and --nodes M (torchrun
--nnodes) plan each GPU for its own rank's micro-batch of --batch sequences (meft train's --batch-size is the
global batch, split across the N x M ranks), host RAM per node (one copy of the stores per node, shared by
its ranks, + staging, pending gradients and row-exchange buffers per rank), and the bytes each rank exchanges
per step for the row gradients: at most (ids + union rows x 2d x wire bytes) per layer, the analytic minimum,
and what the reducer sends (an fp32 block).

examples:
  meft plan --model llama-2-7b --gpu-mem 24GiB --seq 512 --batch 4 --gradient-checkpointing \\
            --adapter-rows 8464 --expert-size 23 --active-per-token 64 --backbone lomo
  meft plan --model ./my-hf-folder --method dense --adapter-rows 33856 --json
  meft plan --model llama-3-8b --method full --gpu-mem 80GB
  meft plan --model llama-2-7b --gpu-mem 80GB --gpus 8 --nodes 2 --backbone lomo   # per GPU, per node
"""


def add_parser(sub) -> None:
    p = add_command(sub, "plan", help="estimate GPU peak memory and host RAM of a training step (no GPU needed)",
                    description=__doc__, epilog=EPILOG, run=run,
                    groups=[(PlanOptions, "plan"), (MeftConfig, "adapter (MeftConfig)")])
    p.add_argument("--debug", action="store_true", help="Show full tracebacks for user errors.")


def run(args: argparse.Namespace) -> int:
    opts, cfg = resolve_options(args, [PlanOptions, MeftConfig])
    res = plan(opts, cfg)
    print(json.dumps(res, indent=2) if opts.json else format_plan(res))
    return 0
