"""One rank of tests/meft/train/test_dp_exact.py under torchrun (2 ranks, gloo):

    torchrun --standalone --nproc_per_node=2 tests/meft/train/dp_exact_worker.py OUT_DIR CASE...

CASE "frozen": frozen backbone, grad_accum_steps 2; "lomo" / "adalomo": that backbone trained in backward,
grad_accum_steps 1 (a fused backbone optimizer cannot accumulate). Rank r trains a wrapped tiny Llama on
shard r of every global micro-batch with `meft.train.loop.train_step` (the loop `meft train` runs) and saves
OUT_DIR/{case}_rank{r}.pt: its losses, the stores (rows, moments, per-row steps), router gates and backbone.
`run_case` is also the single-process reference the test runs on the whole batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import meft  # noqa: E402
from meft.train.loop import train_step  # noqa: E402
from tests.meft.adapter.test_wrap import small_config, tiny_model  # noqa: E402

__all__ = ["CASES", "WORLD", "STEPS", "config", "global_micro_batches", "run_case"]

CASES = {"frozen": 2, "lomo": 1, "adalomo": 1}  # case -> grad_accum_steps
WORLD, STEPS, PER_RANK, LENGTH = 2, 4, 2, 10  # sequences per rank and micro-batch


def config(case: str):
    # every row may be active (the budget does not bind: N ranks would otherwise have N budgets), fp32 wire
    return small_config(grad_accum_steps=CASES[case], max_active_rows=256,
                        backbone="frozen" if case == "frozen" else case, backbone_lr=1e-3)


def global_micro_batches(case: str) -> list[list[torch.Tensor]]:
    """[STEPS][accum] global micro-batches [WORLD * PER_RANK, LENGTH]; rank r takes rows r*PER_RANK.."""
    g = torch.Generator().manual_seed(11)
    return [[torch.randint(3, 96, (WORLD * PER_RANK, LENGTH), generator=g) for _ in range(CASES[case])]
            for _ in range(STEPS)]


def run_case(case: str, rank: int | None) -> dict:
    """Train `case`; rank None: one process on the whole micro-batches; else shard `rank` of each."""
    model = meft.wrap(tiny_model("llama"), config(case))
    model.train()
    rt, accum, losses = model.meft, CASES[case], []
    for step in global_micro_batches(case):
        parts = [ids if rank is None else ids[rank * PER_RANK:(rank + 1) * PER_RANK] for ids in step]
        batches = [{"input_ids": p, "attention_mask": torch.ones_like(p), "labels": p} for p in parts]
        loss, _ = train_step(model, rt, batches, accum)
        losses.append(loss)
    rt.sync_to_host()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".gate")}
    out = {"losses": losses,
           "stores": [{k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
                      for s in rt.stores],
           "gates": [ad.gate.detach().clone() for ad in rt.adapters],
           "backbone": {n: p.detach().clone() for n, p in model.named_parameters() if n in trained}}
    rt.close()
    return out


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in cases:
        torch.save(run_case(case, dist.get_rank()), out / f"{case}_rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
