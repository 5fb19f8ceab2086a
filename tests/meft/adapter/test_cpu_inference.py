"""CPU inference reads each token's own rows (`meft.adapter.cpu_inference`) == the gathered-union path."""

import pytest
import torch

import meft.adapter.layer as layer_mod
from meft.adapter.cpu_inference import reference_token_rows_delta, token_rows_delta
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
    products (`per_token_inference=False`), and the kernel really ran (once per adapter)."""
    model = _trained(offload=True, inference_rows="resident", wire_dtype=wire)
    calls = []
    real = layer_mod.token_rows_delta
    monkeypatch.setattr(layer_mod, "token_rows_delta", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask, positions = _padded(_seqs()[:6], "left")
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert len(calls) == len(model.meft.adapters)
        model.meft.per_token_inference = False
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
