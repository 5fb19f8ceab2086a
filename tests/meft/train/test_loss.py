"""causal_lm_loss (logits only at labelled positions) == the plain HF loss, value and gradients."""

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
