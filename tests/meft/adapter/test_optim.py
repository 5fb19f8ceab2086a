"""meft.adapter.optim.MeftOptimizer: its router-gate update is torch.optim.AdamW's, step for step.

The gates of a real wrapped model are trained by MeftOptimizer; a deep copy of each gate is stepped by
`torch.optim.AdamW` on exactly the same gradients. They must agree after every step (fp32 tolerance),
with and without an lr schedule and with gate clipping (which both sides apply with clip_grad_norm_).
"""

import pytest
import torch

import meft
from tests.meft.adapter.test_wrap import batch, small_config, tiny_model


@pytest.mark.parametrize("clip", ["none", "layer"])
def test_router_step_equals_torch_adamw(clip):
    model = meft.wrap(tiny_model(), small_config(router_lr=3e-2, clip=clip, max_norm=0.05))
    opt = model.meft.optimizer
    gates = [ad.gate for ad in model.meft.adapters]
    twins = [torch.nn.Parameter(g.detach().clone()) for g in gates]
    g0 = opt.router_group
    ref = torch.optim.AdamW(twins, lr=g0["lr"], betas=g0["betas"], eps=g0["eps"], weight_decay=g0["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    model.train()
    ids = batch(4, 12)
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        for g, t in zip(gates, twins):
            assert g.grad is not None
            if step > 0:  # values start at 0, so the gates' first gradient is 0; later ones are not
                assert g.grad.abs().sum() > 0, "the gates must receive gradients"
            t.grad = g.grad.detach().clone()
        if clip != "none":
            torch.nn.utils.clip_grad_norm_(twins, 0.05)
        opt.step()
        opt.zero_grad()
        ref.step()
        ref.zero_grad()
        sched.step()
        ref_sched.step()
        for g, t in zip(gates, twins):
            torch.testing.assert_close(g.detach(), t.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")
    model.meft.close()
