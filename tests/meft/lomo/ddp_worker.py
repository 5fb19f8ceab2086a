"""torchrun worker for tests/meft/lomo/test_distributed.py: Lomo / AdaLomo over gloo, one data shard per rank.

Usage: torchrun --standalone --nproc_per_node=2 tests/meft/lomo/ddp_worker.py OUT_DIR KIND...
KIND in lomo, adalomo (write OUT_DIR/{kind}_rank{r}.pt, the final parameters) and ddp (writes
OUT_DIR/ddp_rank{r}.txt: what happens when the model is wrapped in DistributedDataParallel).
`tiny_model`, `full_batches` and `make_opt` are imported by the test for the single-process reference.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from meft.lomo.optimizers import AdaLomo, Lomo

__all__ = ["TinyLM", "tiny_model", "full_batches", "make_opt", "train", "STEPS", "BATCH"]

STEPS, BATCH, SEQ, VOCAB = 3, 4, 8, 64


class TinyLM(nn.Module):
    """Embedding -> 2 MLP blocks -> tied output projection."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                                    for _ in range(2))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):  # ids [B, T] -> mean next-token loss
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b(h)
        logits = self.head(self.norm(h))  # [B, T, V]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def tiny_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def full_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]  # [B, T]


def make_opt(kind: str, params):
    if kind == "lomo":
        return Lomo(params, lr=0.1, weight_decay=0.01, clip="global", max_norm=0.5)
    return AdaLomo(params, lr=0.01, weight_decay=0.01, clip="global", max_norm=0.5)


def train(model, opt, shards) -> None:
    for ids in shards:
        opt.backward(model(ids))
        opt.step()


def ddp_probe(out_dir: str, rank: int) -> None:
    """What happens when the model is wrapped in DDP: record refusals and DDP's effect on .grad."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    lines = []
    ddp = DDP(tiny_model())
    try:
        Lomo(ddp, lr=0.1)
        lines.append("model: accepted")
    except ValueError as e:
        lines.append(f"model: ValueError {e}")
    opt = Lomo(list(ddp.module.parameters()), lr=0.1)  # params of a DDP-wrapped model: undetectable here
    ids = full_batches()[0][2 * rank:2 * rank + 2]
    ddp(ids).backward()
    grads = [p.grad for p in ddp.module.parameters() if p.grad is not None]
    zero = sum(bool((g == 0).all()) for g in grads)
    lines.append(f"grads after backward: {len(grads)} ({zero} all-zero)")
    try:
        opt.step()
        lines.append("step: accepted")
    except RuntimeError as e:
        lines.append(f"step: RuntimeError {e}")
    with open(os.path.join(out_dir, f"ddp_rank{rank}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    opt.remove_hooks()
    del ddp, opt  # the reducer must go before the process group (else a rare abort at exit)
    gc.collect()


def main() -> None:
    out_dir, kinds = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for kind in kinds:
        if kind == "ddp":
            ddp_probe(out_dir, rank)
            continue
        if rank == 1:
            torch.manual_seed(99)  # a different init on purpose: the optimizer broadcasts rank 0's
        model = tiny_model() if rank == 0 else TinyLM()
        opt = make_opt(kind, model)
        per = BATCH // world
        train(model, opt, [ids[rank * per:(rank + 1) * per] for ids in full_batches()])
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f"{kind}_rank{rank}.pt"))
        opt.remove_hooks()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
