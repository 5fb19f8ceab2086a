"""The row options of a wrapped model: `row_optimizer="sgd"` (plain SGD on the host rows) and
`compile_router=True` (the compiled routing), each against its plain twin through a real training loop."""

import pytest
import torch

import meft
from experiments.count_adapter_ops import tiny_llama
from meft.adapter.router import COMPILE_FAILED

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CFG = dict(adapter_rows=64, expert_size=8, experts_per_token=2, max_active_rows=32)


def _train(steps: int = 3, offload: bool = False, **kw):
    model, batch = tiny_llama()
    meft.wrap(model, meft.MeftConfig(**CFG, offload=offload, **kw))
    opt = model.meft.optimizer
    losses = []
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.meft.scheduler.flush()
    model.meft.scheduler.sync_to_host()
    rows = torch.cat([s.weights.clone() for s in model.meft.stores])
    return losses, rows, model


def test_sgd_rows_offloaded_equal_resident_and_differ_from_adamw():
    losses_sgd, rows_sgd, model = _train(row_optimizer="sgd", adapter_lr=1.0)
    assert all(o.rule == "sgd" for o in model.meft.sparse_optimizers)
    assert rows_sgd.abs().sum() > 0  # the values moved
    off_losses, off_rows, off_model = _train(row_optimizer="sgd", adapter_lr=1.0, offload=True)
    assert torch.equal(off_model.meft.stores[0].exp_avg, torch.zeros_like(off_model.meft.stores[0].exp_avg))
    assert off_losses == pytest.approx(losses_sgd, rel=1e-5)  # the host kernel and the resident twin agree
    assert torch.allclose(off_rows, rows_sgd, rtol=1e-4, atol=1e-6)
    _, rows_adamw, _ = _train(adapter_lr=1.0)
    assert not torch.allclose(rows_sgd, rows_adamw)
    assert losses_sgd[-1] < losses_sgd[0]


def test_compiled_router_trains_like_the_eager_one():
    torch._dynamo.reset()  # recompile counts add up across a process
    COMPILE_FAILED.clear()
    eager_losses, eager_rows, _ = _train()
    fused_losses, fused_rows, model = _train(compile_router=True)
    assert model.meft.config.compile_router and not COMPILE_FAILED  # the compiled core ran
    assert fused_losses == pytest.approx(eager_losses, rel=1e-6)
    assert torch.allclose(fused_rows, eager_rows, rtol=1e-5, atol=1e-7)
