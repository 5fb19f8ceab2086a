"""Key-Experts routing: top experts per token, softmax gates, row budget kept by total weight, re-routing
of tokens that lost experts, padding that never routes, per-token routing without a budget, gate init."""

import pytest
import torch

from meft.adapter.router import expert_weights, gate_weights, init_gate, route, update_balance_bias
from meft.profile import SyncCounter

S = 4


def _route(x, gate, k, budget, valid=None, bias=None):
    return route(x, gate, experts_per_token=k, expert_size=S, max_active_rows=budget, valid=valid, bias=bias)


def _weights_by_expert(x, gate, r) -> torch.Tensor:
    """[T, E] each token's gate weight on each expert (the kept-slot columns scattered back)."""
    out = torch.zeros(x.shape[0], gate.shape[0] + 1)
    slots = torch.where(r.kept >= 0, r.kept, gate.shape[0])
    return out.index_copy(1, slots, gate_weights(x, gate, r))[:, :-1]


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
    assert float(r.dropped) == pytest.approx(1 / 3)  # expert 7 dropped for every token
    # re-routed among the kept: experts 2 and 5 (only two are kept), half the weight each
    torch.testing.assert_close(gate_weights(x, gate, r), torch.full((6, 2), 0.5))


def test_budget_reroutes_tokens_among_kept_experts():
    """A token that lost experts to the budget takes its top experts among the kept ones, with its gate
    weights the softmax over those: every token keeps k experts and weights summing to 1."""
    g = torch.Generator().manual_seed(1)
    x, gate = torch.randn(30, 8, generator=g), torch.randn(16, 8, generator=g)
    k = 3
    r_full = _route(x, gate, k, 16 * S)
    assert float(r_full.dropped) == 0.0
    r = _route(x, gate, k, 4 * S)
    kept = r.active_kept()
    assert kept.numel() == 4
    scores = x @ gate.T
    orig = scores.topk(k, dim=1).indices
    want_dropped = (~torch.isin(orig, kept)).float().mean()
    assert 0 < float(r.dropped) and float(r.dropped) == pytest.approx(float(want_dropped))
    masked = torch.full_like(scores, float("-inf"))
    masked[:, kept] = scores[:, kept]
    top_s, top_i = masked.topk(k, dim=1)  # each token's top k among the kept experts
    assert torch.equal(r.top_idx.sort(1).values, top_i.sort(1).values)
    c = gate_weights(x, gate, r)  # [T, 4]
    torch.testing.assert_close(c.sum(1), torch.ones(30))
    assert ((c > 0).sum(1) == k).all()
    want = torch.zeros(30, 16).scatter_(1, top_i, torch.softmax(top_s, dim=1))
    torch.testing.assert_close(_weights_by_expert(x, gate, r), want)


def test_padding_never_routes_nor_counts():
    """Padding tokens choose nothing, count toward no expert's weight, and get zero gate weights: the
    real tokens route exactly as they would alone, whatever the padding holds (even nan)."""
    g = torch.Generator().manual_seed(5)
    x, gate = torch.randn(40, 8, generator=g), torch.randn(32, 8, generator=g)
    valid = torch.rand(40, generator=g) < 0.5
    x_pad = x.clone()
    x_pad[~valid] = x_pad[~valid] * 50 + 3  # padding that would dominate the budget if it routed
    x_pad[~valid][:2] = float("nan")
    for budget in (3 * S, None):
        r = _route(x_pad, gate, 2, budget, valid=valid)
        alone = _route(x[valid], gate, 2, budget)
        assert r.active_kept().tolist() == alone.active_kept().tolist()
        assert (r.pos[~valid] == -1).all()
        w = _weights_by_expert(x_pad, gate, r)
        assert (w[~valid] == 0).all()
        torch.testing.assert_close(w[valid], _weights_by_expert(x[valid], gate, alone), rtol=0, atol=0)
    r = _route(x_pad, gate, 2, S, valid=valid)
    assert float(r.dropped) == pytest.approx(float(_route(x[valid], gate, 2, S).dropped))


def test_no_budget_routes_each_token_to_its_own_experts():
    """max_active_rows=None (inference): a token's experts and weights do not depend on its batch."""
    g = torch.Generator().manual_seed(6)
    x, gate = torch.randn(64, 8, generator=g), torch.randn(32, 8, generator=g)
    r = _route(x, gate, 3, None)
    assert r.kept.numel() == 32 and float(r.dropped) == 0.0  # min(E, T * k) slots, nothing dropped
    top_s, top_i = (x @ gate.T).topk(3, dim=1)
    want = torch.zeros(64, 32).scatter_(1, top_i, torch.softmax(top_s, dim=1))
    torch.testing.assert_close(_weights_by_expert(x, gate, r), want)
    one = _route(x[5:6], gate, 3, None)
    assert one.kept.numel() == 3 and one.active_kept().tolist() == sorted(top_i[5].tolist())
    torch.testing.assert_close(_weights_by_expert(x[5:6], gate, one), want[5:6])


def test_route_and_gate_weights_issue_no_sync():
    g = torch.Generator().manual_seed(7)
    x, gate = torch.randn(50, 8, generator=g), torch.randn(32, 8, generator=g, requires_grad=True)
    valid = torch.rand(50, generator=g) < 0.7
    counter = SyncCounter()
    with counter:
        for budget in (3 * S, None):
            r = _route(x, gate, 2, budget, valid=valid)
            gate_weights(x, gate, r).sum().backward()
    assert counter.count() == 0, counter.sites


def test_init_gate_aligned_with_keys():
    """Gate row e = the unit-norm mean of expert e's keys: at init a token's score for expert e is its
    rows' mean pre-activation k . x over the norm of their mean key."""
    g = torch.Generator().manual_seed(8)
    keys = torch.rand(64 * S, 16, generator=g) * 2 - 1  # [N, d]
    gate = init_gate(keys, S)
    assert gate.shape == (64, 16) and gate.dtype == torch.float32
    torch.testing.assert_close(gate.norm(dim=1), torch.ones(64))
    x = torch.randn(20, 16, generator=g)
    mean_pre = (x @ keys.T).view(20, 64, S).mean(-1)  # [T, E] mean k . x over each expert's rows
    mean_norm = keys.view(64, S, 16).mean(1).norm(dim=1)  # [E]
    torch.testing.assert_close(x @ gate.T, mean_pre / mean_norm)
    with pytest.raises(ValueError, match="expert_size=5"):
        init_gate(keys, 5)


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


def test_balance_bias_chooses_but_does_not_weigh():
    """The balance bias changes which experts a token chooses (and the re-routing), not their weights:
    those stay the softmax of the unbiased scores. update_balance_bias moves demand to idle experts."""
    g = torch.Generator().manual_seed(9)
    x, gate = torch.randn(20, 8, generator=g), torch.randn(16, 8, generator=g)
    bias = torch.zeros(16)
    bias[[3, 11]] = 100.0  # every token chooses experts 3 and 11
    r = _route(x, gate, 2, None, bias=bias)
    assert r.active_kept().tolist() == [3, 11] and r.load[[3, 11]].tolist() == [20.0, 20.0]
    s = (x @ gate.T)[:, [3, 11]]
    torch.testing.assert_close(_weights_by_expert(x, gate, r)[:, [3, 11]], torch.softmax(s, dim=1))
    update_balance_bias(bias, r.load, 0.5)  # mean load 2.5: 3 and 11 over it, the rest idle
    want = torch.full((16,), 0.5)
    want[[3, 11]] = 99.5
    torch.testing.assert_close(bias, want)
