"""causal_lm_loss (logits only at labelled positions) == the plain HF loss, value and gradients."""

import pytest
import torch

from meft.train.loss import causal_lm_loss
from tests.meft.adapter.test_wrap import tiny_model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 14), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 9:12] = ids[0, 9:12]     # answers at different positions per row
    labels[1, 4:6] = ids[1, 4:6]
    labels[2, 13] = ids[2, 13]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0                   # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_matches_hf_loss_and_grads():
    batch = _batch()
    fast_model, plain_model = tiny_model("llama"), tiny_model("llama")
    fast = causal_lm_loss(fast_model, batch)
    plain = plain_model(**batch).loss
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    fast.backward()
    plain.backward()
    for (n, a), b in zip(fast_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_falls_back_without_logits_to_keep():
    model = tiny_model("opt")  # whatever the architecture, the loss equals HF's
    batch = _batch()
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["lomo", "adalomo"])
def test_step_loss_under_lomo_takes_lm_loss_and_trains_like_the_plain_loss(backbone, monkeypatch):
    """`meft train --backbone lomo|adalomo`: the head in vocabulary chunks (no [V, d] head gradient under
    Lomo) through the decoder, whose forward hook opens the micro-batch, against the plain HF loss."""
    import meft
    import meft.lomo.head as head
    from meft.train.loop import train_step
    from tests.meft.adapter.test_wrap import adapter_state, small_config

    def run(use_lm_loss: bool):
        model = meft.wrap(tiny_model("llama"), small_config(backbone=backbone, backbone_lr=1e-2))
        model.train()
        calls = []
        real = head.lm_loss

        def counted(*a, **kw):
            calls.append(1)
            return real(*a, **kw)

        monkeypatch.setattr("meft.train.loss.lm_loss", counted)
        monkeypatch.setattr("meft.train.loss.lm_loss_supported", lambda m: use_lm_loss)
        losses = [train_step(model, model.meft, [_batch()], 1)[0] for _ in range(3)]
        assert len(calls) == (3 if use_lm_loss else 0)
        return losses, adapter_state(model), [p.detach().clone() for p in model.parameters()]

    (fast_loss, fast_rows, fast_w), (plain_loss, plain_rows, plain_w) = run(True), run(False)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast_loss[-1] < fast_loss[0]  # it trains
    for a, b in zip(fast_rows + fast_w, plain_rows + plain_w):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
