"""Key-Experts routing: top experts per token, softmax gates, row budget kept by total weight."""

import pytest
import torch

from meft.adapter.router import expert_weights, gate_weights, route

S = 4


def _route(x, gate, k, budget):
    return route(x, gate, experts_per_token=k, expert_size=S, max_active_rows=budget)


@pytest.mark.parametrize("seed", range(5))
def test_budget_never_exceeded_and_ids_consistent(seed):
    g = torch.Generator().manual_seed(seed)
    x, gate = torch.randn(200, 8, generator=g), torch.randn(64, 8, generator=g)
    for budget in (S, 3 * S, 10 * S + 3, 64 * S):
        r = _route(x, gate, 4, budget)
        b = min(64, budget // S)
        assert r.kept.shape == (b,) and r.ids.shape == (b * S,)  # fixed shapes: one slot per budget expert
        assert r.n_rows <= budget and r.n_rows % S == 0
        ids, kept = r.active_ids(), r.active_kept()
        assert torch.equal(ids, torch.unique(ids))  # sorted and unique
        assert torch.equal(r.ids[: ids.numel()], ids) and (r.ids[ids.numel():] == -1).all()  # used first
        assert torch.equal(r.kept[: kept.numel()], kept) and (r.kept[kept.numel():] == -1).all()
        assert torch.equal(ids.view(-1, S)[:, 0] // S, kept)
        kept_of = torch.full((64,), -1, dtype=torch.long)
        kept_of[kept] = torch.arange(kept.numel())
        assert torch.equal(r.pos, kept_of[r.top_idx])


def test_kept_experts_follow_total_routing_weight():
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(50, 8, generator=g), torch.randn(16, 8, generator=g)
    r_all = _route(x, gate, 3, 16 * S)
    scores = x @ gate.T
    top_s, top_i = scores.topk(3, dim=1)
    assert torch.equal(r_all.top_idx, top_i)
    w = expert_weights(top_i, torch.softmax(top_s, 1), 16)
    chosen = torch.unique(top_i)
    assert torch.equal(r_all.active_kept(), chosen)  # budget not binding: the whole union
    budget_experts = 5
    r = _route(x, gate, 3, budget_experts * S)
    best = sorted(range(16), key=lambda e: (-float(w[e]), e))[:budget_experts]
    assert r.kept.tolist() == sorted(best)  # budget binding: every slot used
    assert r.kept.tolist() != list(range(budget_experts))  # not MEFT's truncation of sorted ids


def test_ties_go_to_lower_index():
    # every token scores experts 2, 5, 7 equally high (identical gate rows) -> equal total weight
    gate = torch.zeros(8, 4)
    gate[[2, 5, 7]] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(6, 1)
    r = _route(x, gate, 3, 2 * S)
    assert r.kept.tolist() == [2, 5]
    assert (r.pos[:, 2] == -1).all()  # expert 7 dropped for every token


def test_gate_weights_softmax_and_dropped_experts():
    g = torch.Generator().manual_seed(1)
    x, gate = torch.randn(30, 8, generator=g), torch.randn(16, 8, generator=g)
    r_full = _route(x, gate, 3, 16 * S)
    c_full = gate_weights(x, gate, r_full)  # [T, n]
    torch.testing.assert_close(c_full.sum(1), torch.ones(30))
    assert int((c_full > 0).sum(1).max()) == 3
    r = _route(x, gate, 3, 4 * S)
    c = gate_weights(x, gate, r)
    assert c.shape == (30, 4)
    for t in range(30):  # kept experts keep their full-softmax weight; dropped ones contribute 0
        for j, e in enumerate(r.active_kept().tolist()):
            col = (r_full.kept == e).nonzero()
            want = c_full[t, col].item() if col.numel() else 0.0
            assert c[t, j].item() == pytest.approx(want, abs=1e-7)


def test_gate_weights_differentiable():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=g, requires_grad=True)
    gate = torch.randn(16, 8, generator=g, requires_grad=True)
    r = _route(x.detach(), gate.detach(), 2, 6 * S)
    c = gate_weights(x, gate, r)
    (c * torch.randn(c.shape, generator=g)).sum().backward()
    assert x.grad.abs().sum() > 0 and gate.grad.abs().sum() > 0
    # experts no token chose get no gradient; dropped-but-chosen ones do, through the softmax
    unchosen = [e for e in range(16) if e not in r.top_idx.unique().tolist()]
    assert unchosen and gate.grad[unchosen].abs().max() == 0


def test_unused_slots_get_no_weight():
    """Fewer experts chosen than the budget: the unused slots (kept -1, ids -1) come last and carry no
    gate weight, so whatever rows sit there contribute nothing and get no gradient."""
    g = torch.Generator().manual_seed(3)
    x, gate = torch.randn(3, 8, generator=g), torch.randn(32, 8, generator=g)
    r = _route(x, gate, 2, 16 * S)  # 3 tokens x 2 experts <= 6 used of 16 slots
    n = r.active_kept().numel()
    assert n <= 6 and (r.kept[n:] == -1).all() and r.kept.shape == (16,)
    c = gate_weights(x, gate, r)
    assert c.shape == (3, 16) and (c[:, n:] == 0).all()
    torch.testing.assert_close(c.sum(1), torch.ones(3))
