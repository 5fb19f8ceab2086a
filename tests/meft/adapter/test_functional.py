"""Fast path over gathered rows == dense masked reference (outputs and every gradient), fp32."""

import pytest
import torch

from meft.adapter.functional import SparseAdapterFunction, dense_adapter, sparse_adapter, topk_mask
from meft.adapter.router import gate_weights, route

T, D, N, S = 24, 16, 128, 8
E = N // S


def _setup(seed=0, dtype=torch.float32, t=T, d=D, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=dtype)
    keys = torch.randn(n, d, generator=g, dtype=dtype) * d ** -0.5
    values = torch.randn(n, d, generator=g, dtype=dtype) * 0.1
    gate = torch.randn(n // S, d, generator=g, dtype=torch.float32)
    return x, keys, values, gate


def _grads(out, tensors, seed=3):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, gy)


@pytest.mark.parametrize("case", ["all_experts", "budget", "budget_topk"])
def test_fast_path_equals_dense_reference(case):
    x, keys, values, gate = _setup()
    k, budget, apt = {"all_experts": (E, N, None), "budget": (3, 5 * S, None), "budget_topk": (3, 5 * S, 6)}[case]
    routing = route(x, gate, experts_per_token=k, expert_size=S, max_active_rows=budget)
    if case == "all_experts":
        assert routing.n_rows == N
    else:
        assert routing.n_rows == budget
    # dense: all N rows on the device as leaves
    xd, kd, vd, gd = (t.clone().requires_grad_(True) for t in (x, keys, values, gate))
    yd = dense_adapter(xd, kd, vd, gd, routing, scale=0.7, active_per_token=apt)
    gxd, gkd, gvd, ggd = _grads(yd, (xd, kd, vd, gd))
    # fast: gathered rows [R, 2d]
    xf, gf = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    rows = torch.cat([keys, values], 1)[routing.ids].clone().requires_grad_(True)
    coef = gate_weights(xf, gf, routing)
    yf = sparse_adapter(xf, rows, coef, expert_size=S, scale=0.7, active_per_token=apt)
    gxf, grows, ggf = _grads(yf, (xf, rows, gf))
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yf, yd, **tol)
    torch.testing.assert_close(gxf, gxd, **tol)
    torch.testing.assert_close(ggf, ggd, **tol)
    torch.testing.assert_close(grows[:, :D], gkd[routing.ids], **tol)
    torch.testing.assert_close(grows[:, D:], gvd[routing.ids], **tol)
    inactive = torch.ones(N, dtype=torch.bool)
    inactive[routing.ids] = False
    assert gkd[inactive].abs().sum() == 0 and gvd[inactive].abs().sum() == 0
    assert ggf.abs().max() > 0 and gxf.abs().max() > 0  # gradients really flow


@pytest.mark.parametrize("train_keys", [True, False])
def test_padding_and_frozen_keys_fast_equals_dense(train_keys):
    """Padding tokens (valid False) get zero output and zero dx; frozen keys get a zero key gradient on
    the fast path, as detached keys do on the dense path; everything else agrees."""
    x, keys, values, gate = _setup(4)
    valid = torch.rand(T, generator=torch.Generator().manual_seed(5)) < 0.6
    routing = route(x, gate, experts_per_token=3, expert_size=S, max_active_rows=5 * S, valid=valid)
    xd, kd, vd, gd = (t.clone().requires_grad_(True) for t in (x, keys, values, gate))
    yd = dense_adapter(xd, kd, vd, gd, routing, scale=0.7, train_keys=train_keys)
    gxd, gvd, ggd = _grads(yd, (xd, vd, gd))
    xf, gf = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    rows = torch.cat([keys, values], 1)[routing.ids.clamp(min=0)].clone().requires_grad_(True)
    yf = sparse_adapter(xf, rows, gate_weights(xf, gf, routing), expert_size=S, scale=0.7, train_keys=train_keys)
    gxf, grows, ggf = _grads(yf, (xf, rows, gf))
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yf, yd, **tol)
    torch.testing.assert_close(gxf, gxd, **tol)
    torch.testing.assert_close(ggf, ggd, **tol)
    torch.testing.assert_close(grows[:, D:], gvd[routing.ids], **tol)
    assert (yf[~valid] == 0).all() and (gxf[~valid] == 0).all() and yf[valid].abs().max() > 0
    assert (grows[:, :D].abs().max() > 0) == train_keys


def test_function_gradcheck_float64():
    x, keys, values, gate = _setup(1, torch.float64, t=8, d=6, n=64)  # small: gradcheck is O(inputs)
    routing = route(x, gate, experts_per_token=3, expert_size=S, max_active_rows=3 * S)
    rows = torch.cat([keys, values], 1)[routing.ids].clone().requires_grad_(True)
    coef = gate_weights(x, gate, routing).double().detach().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    fn = lambda a, b, c: SparseAdapterFunction.apply(a, b, c, S, 1.3, None)
    assert torch.autograd.gradcheck(fn, (xg, rows, coef))
    # top-K: the selection is piecewise constant; away from ties (all coefficients > 0, so no
    # zero-valued candidates tie for the last places) it is differentiable and must check too
    coef_pos = (torch.rand(coef.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
                + 0.5).requires_grad_(True)
    fn_k = lambda a, b, c: SparseAdapterFunction.apply(a, b, c, S, 1.3, 7)
    assert torch.autograd.gradcheck(fn_k, (xg, rows, coef_pos))


def test_fast_path_equals_plain_torch_formula():
    x, keys, values, gate = _setup(2)
    routing = route(x, gate, experts_per_token=2, expert_size=S, max_active_rows=N)
    rows = torch.cat([keys, values], 1)[routing.ids]
    coef = gate_weights(x, gate, routing)
    a = torch.relu(x @ rows[:, :D].T) * coef.repeat_interleave(S, dim=1)
    a = a * topk_mask(a, 4)
    want = 2.0 * a @ rows[:, D:]
    got = sparse_adapter(x, rows, coef, expert_size=S, scale=2.0, active_per_token=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # exact top-K: each token keeps at most 4 nonzero row activations
    assert int(((a != 0).sum(1) <= 4).all())


def test_row_width_checked():
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="rows width"):
        sparse_adapter(x, torch.randn(8, D), torch.randn(4, 1), expert_size=8)
