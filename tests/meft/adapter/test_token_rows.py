"""Each token reads its own rows on the CPU (`meft.adapter.token_rows`) == the dense products over the gathered
rows (`meft.adapter.functional.SparseAdapterFunction`), in training (values and every gradient) and inference."""

import pytest
import torch

import meft
import meft.adapter.layer as layer_mod
from meft.adapter.functional import sparse_adapter
from meft.adapter.router import gate_weights, route
from meft.adapter.token_rows import reference_token_rows_delta, token_rows_delta
from tests.meft.adapter.test_routing_model import _padded, _seqs, _trained

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_its_plain_twin(dtype):
    g = torch.Generator().manual_seed(0)
    T, d, S, E, k = 37, 24, 8, 12, 3
    x = torch.randn(T, d, generator=g)
    table = torch.randn(E * S, 2 * d, generator=g).to(dtype)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    weights[5] = 0.0  # a padding token: no output
    fast = token_rows_delta(x, table, experts, weights, expert_size=S, scale=0.5)
    plain = reference_token_rows_delta(x, table, experts, weights, expert_size=S, scale=0.5)
    torch.testing.assert_close(fast, plain, **TOL)
    assert fast[5].abs().max() == 0 and fast.abs().max() > 0.1


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_model_logits_equal_the_general_path(wire, monkeypatch):
    """A trained wrapped model, left-padded batch, no_grad: per-token rows == the gathered union's dense
    products (`token_rows=False`), and the kernel really ran (once per adapter)."""
    model = _trained(offload=True, inference_rows="resident", wire_dtype=wire)
    calls = []
    real = layer_mod.token_rows_delta
    monkeypatch.setattr(layer_mod, "token_rows_delta", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask, positions = _padded(_seqs()[:6], "left")
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert len(calls) == len(model.meft.adapters)
        model.meft.token_rows = False
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert len(calls) == len(model.meft.adapters)  # the general path this time
    real_pos = mask.bool()
    torch.testing.assert_close(fast[real_pos], plain[real_pos], **TOL)
    model.meft.close()


def test_forwards_with_gradients_take_the_general_path(monkeypatch):
    model = _trained(offload=True, inference_rows="resident")
    monkeypatch.setattr(layer_mod, "token_rows_delta", lambda *a, **kw: pytest.fail("no autograd here"))
    ids, mask, positions = _padded(_seqs()[:2], "left")
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # eval mode, grad enabled
    out.sum().backward()
    assert model.meft.adapters[0].gate.grad is not None
    model.meft.close()


@pytest.mark.parametrize("train_keys", [True, False])
def test_training_function_equals_the_dense_twin(train_keys):
    """A micro-batch routed with a binding budget (re-routing, tokens with fewer slots) and padding: y, dx,
    the row gradient [dK | dV] and the router gate's gradient equal the dense products'."""
    g = torch.Generator().manual_seed(3)
    T, d, S, E, k = 41, 16, 4, 24, 3
    x0 = torch.randn(T, d, generator=g)
    gate0 = torch.randn(E, d, generator=g)
    valid = torch.ones(T, dtype=torch.bool)
    valid[[4, 17, 40]] = False  # padding: routes nowhere, adds nothing
    routing = route(x0, gate0, experts_per_token=k, expert_size=S, max_active_rows=8 * S, valid=valid)
    n_rows = routing.ids.numel()
    rows0 = torch.randn(n_rows, 2 * d, generator=g)
    gy = torch.randn(T, d, generator=g)

    def run(per_token: bool):
        x, gate, rows = (t.clone().requires_grad_(True) for t in (x0, gate0, rows0))
        coef = gate_weights(x, gate, routing)  # [T, n]
        y = sparse_adapter(x, rows, coef, expert_size=S, scale=0.7, train_keys=train_keys,
                           slots=routing.pos if per_token else None)
        y.backward(gy)
        return y.detach(), x.grad, rows.grad, gate.grad

    fast, plain = run(True), run(False)
    for name, a, b in zip(("y", "dx", "drows", "dgate"), fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert fast[0][4].abs().max() == 0 and fast[0].abs().max() > 0.1
    if not train_keys:
        assert fast[2][:, :d].abs().max() == 0  # frozen keys: no key gradient


def test_training_through_the_model_equals_the_dense_twin(monkeypatch):
    """3 offloaded training steps of a wrapped model (budget binding) with per-token rows == dense products:
    losses, rows and gates."""
    import meft.adapter.functional as functional
    from meft.train.loop import train_step
    from tests.meft.adapter.test_wrap import adapter_state, small_config, tiny_model
    from tests.meft.data.test_packed import _qa_batch

    calls = []
    real = functional.token_rows_adapter
    monkeypatch.setattr(functional, "token_rows_adapter", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(per_token: bool):
        model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=24))
        model.meft.token_rows = per_token
        model.train()
        losses = [train_step(model, model.meft, [_qa_batch()], 1)[0] for _ in range(3)]
        return losses, adapter_state(model)

    (fast_loss, fast_state) = run(True)
    assert len(calls) == 3 * 2  # every step, both adapters
    (plain_loss, plain_state) = run(False)
    assert len(calls) == 3 * 2
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_state, plain_state):  # AdamW scales a tiny gradient's rounding up to ~lr x 2e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)
