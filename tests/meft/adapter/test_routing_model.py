"""Routing on a real (tiny) HF Llama: padding never routes, inference is batch invariant, KV-cache decoding
equals a full forward.

Every model here has been trained a few steps first, so the adapter is non-zero, with a row budget that
binds (2 experts per layer per micro-batch): a batch-dependent rule would show in the logits.
"""

import inspect

import pytest
import torch

import meft
from tests.meft.adapter.test_wrap import VOCAB, small_config, tiny_model, train

BUDGET = dict(max_active_rows=16)  # 2 experts of 8 rows: binds for any batch of more than one token
TOL = dict(rtol=1e-5, atol=1e-5)   # fp32: matmuls over other shapes sum in another order
LENGTHS = [7, 12, 4, 9, 12, 5, 11, 8, 6, 10, 3, 12, 7, 9, 4, 10]  # 16 sequences, the longest 12


# the KV cache's name in forward() and its output: `cache` from transformers 5.x, `past_key_values` before
_CACHE = "cache" if "cache" in inspect.signature(tiny_model("llama").forward).parameters else "past_key_values"


def _trained(batch=None, **kw):
    """A wrapped tiny Llama after 4 steps on `batch` ((input_ids, attention_mask), padding unlabelled),
    or on a random unpadded batch; in eval mode."""
    model = meft.wrap(tiny_model("llama"), small_config(**BUDGET, **kw))
    if batch is None:
        train(model, torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(11)), 4)
    else:
        ids, mask = batch
        model.train()
        for _ in range(4):
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            model.meft.optimizer.step()
            model.meft.optimizer.zero_grad()
    model.eval()
    return model


def _seqs(seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, side: str, pad_id: int = 0):
    """(input_ids, attention_mask, position_ids) [B, L] with the sequences padded on `side`."""
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, s.numel()) if side == "right" else slice(width - s.numel(), width)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _real(logits, seqs, i: int, side: str):
    n, width = seqs[i].numel(), logits.shape[1]
    return logits[i, :n] if side == "right" else logits[i, width - n:]


def _adapter_effect(model, ids) -> float:
    with torch.no_grad():
        on = model(input_ids=ids).logits
        for ad in model.meft.adapters:
            ad.enabled = False
        off = model(input_ids=ids).logits
        for ad in model.meft.adapters:
            ad.enabled = True
    return float((on - off).abs().max())


@pytest.mark.parametrize("rows", [dict(offload=True, inference_rows="resident"),
                                  dict(offload=True, inference_rows="fetch"),
                                  dict(offload=False)], ids=["resident", "fetch", "twin"])
def test_eval_logits_do_not_depend_on_the_batch(rows):
    """A sequence's logits alone == inside a batch of 16, left- or right-padded, and inside 16 unpadded
    sequences of its length; the same under no_grad in training mode (also outside training)."""
    model = _trained(**rows)
    seqs = _seqs()
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in seqs]
        assert _adapter_effect(model, seqs[1][None]) > 100 * TOL["atol"]  # the adapter really acts
        for side in ("right", "left"):
            ids, mask, positions = _padded(seqs, side)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            for i in range(len(seqs)):
                torch.testing.assert_close(_real(logits, seqs, i, side), alone[i], **TOL)
        same_len = torch.stack([s for s in seqs if s.numel() == 12]
                               + [torch.randint(3, VOCAB, (12,)) for _ in range(13)])  # [16, 12]
        torch.testing.assert_close(model(input_ids=same_len).logits[0], alone[1], **TOL)
        model.train()  # no_grad in training mode: not training either (no micro-batch, no budget)
        torch.testing.assert_close(model(input_ids=same_len).logits[0], alone[1], **TOL)
    model.meft.close()


def test_kv_cache_decoding_equals_full_forward():
    """Left-padded batch: prefill, then one token at a time with the KV cache (the attention mask covers
    past + current positions) gives the logits of one full forward over the same tokens."""
    model = _trained()
    seqs = [s[:12] for s in _seqs(3)[:4]]
    ids, mask, positions = _padded(seqs, "left")
    prefill = 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill],
                    position_ids=positions[:, :prefill], use_cache=True)
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                        position_ids=positions[:, t:t + 1], use_cache=True, **{_CACHE: getattr(out, _CACHE)})
            steps.append(out.logits)
    decoded = torch.cat(steps, dim=1)  # [B, L, V]
    real = mask.bool()
    torch.testing.assert_close(decoded[real], full[real], **TOL)
    model.meft.close()


def test_generate_batched_equals_alone():
    """Greedy generate() of 4 left-padded prompts == each prompt generated alone (until its EOS; the
    batch pads a finished prompt with pad_token_id)."""
    model = _trained()
    prompts = [s[:n] for s, n in zip(_seqs(4)[:4], (3, 6, 4, 6))]
    ids, mask, _ = _padded(prompts, "left")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        one = model.generate(input_ids=p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = one[0, p.numel():].tolist()
        assert out[i, ids.shape[1]:].tolist() == new + [0] * (6 - len(new))
    model.meft.close()


def _train_logits(model, ids, mask):
    """Logits of one training forward (budget, re-routing), its routing stats; the step is completed."""
    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    stats = model.meft.routing_stats()
    out.logits.sum().backward()
    model.meft.optimizer.step()
    model.meft.optimizer.zero_grad()
    return out.logits.detach(), stats


def test_padding_never_counts_toward_the_training_budget():
    """Right-padded training batch with a binding budget: the real positions' logits and the routing
    stats do not change when the padding tokens change (causal attention keeps padding out of the real
    positions, so the budget is the only way it could reach them), nor when the mask is passed by
    position instead of by keyword."""
    seqs = _seqs(5)[:4]
    ids, mask, _ = _padded(seqs, "right")
    noise = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9))
    other = torch.where(mask.bool(), ids, noise)  # the same real tokens, other padding tokens
    runs = []
    for batch_ids, by_position in ((ids, False), (other, False), (other, True)):
        model = _trained((ids, mask))  # the kept experts have learned something
        if by_position:
            model.train()
            out = model(batch_ids, mask)  # LlamaForCausalLM.forward(input_ids, attention_mask, ...)
            runs.append((out.logits.detach(), model.meft.routing_stats()))
        else:
            runs.append(_train_logits(model, batch_ids, mask))
        model.meft.close()
    real = mask.bool()
    (l0, s0), (l1, s1), (l2, s2) = runs
    assert s0["distinct_experts"] == 2.0 and s0["dropped_share"] > 0  # the budget binds
    torch.testing.assert_close(l1[real], l0[real], rtol=0, atol=0)
    torch.testing.assert_close(l2[real], l0[real], rtol=0, atol=0)
    assert s1 == s0 and s2 == s0
    # without the mask the padding routes: it changes what the real tokens get
    model = _trained((ids, mask))
    l3, _ = _train_logits(model, other, None)
    assert not torch.equal(l3[real], l0[real])
    model.meft.close()


def test_padding_gets_no_adapter_output():
    model = _trained()
    ad = model.meft.adapters[0]
    seqs = _seqs(6)[:3]
    ids, mask, positions = _padded(seqs, "right")
    seen = {}
    ad.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    ad.base.register_forward_hook(lambda m, args, out: seen.setdefault("base", out))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    delta = (seen["out"] - seen["base"]).abs().amax(-1)  # [B, L] adapter output per position
    assert (delta[~mask.bool()] == 0).all() and (delta[mask.bool()] > 0).any()
    model.meft.close()


def test_mismatched_mask_is_an_error():
    model = _trained()
    rt = model.meft
    rt._mask = torch.ones(3, 6, dtype=torch.bool)  # what the pre-hook records for a [3, 6] mask
    for n_tok in (14, 21):  # not a multiple of 3 rows; more than 6 positions per row
        with pytest.raises(ValueError, match=rf"FFN input has {n_tok} tokens.*attention_mask \[3, 6\]"):
            rt.token_mask(rt.adapters[0], torch.randn(n_tok, 32))
    assert rt.token_mask(rt.adapters[0], torch.randn(6, 32)).shape == (6,)  # 3 rows x 2 current tokens
    rt.close()


def test_balance_bias_follows_each_steps_demand():
    """balance='bias': after each optimizer step every adapter's expert_bias moved by
    rate * sign(mean demand - demand), the demand summed over the step's micro-batches (real tokens'
    choices, made with the bias as it was). balance='none' leaves it at zero."""
    from meft.adapter.router import route

    rate = 0.25
    for balance in ("none", "bias"):
        model = meft.wrap(tiny_model("llama"), small_config(balance=balance, balance_rate=rate, grad_accum_steps=2))
        rt, inputs = model.meft, {}
        for ad in rt.adapters:
            ad.register_forward_pre_hook(
                lambda m, args, inputs=inputs: inputs.setdefault(m.index, []).append(args[0].detach()))
        ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        model.train()
        for _ in range(3):
            before = [(ad.expert_bias.clone(), ad.gate.detach().clone()) for ad in rt.adapters]
            inputs.clear()
            for part, m in zip(ids.chunk(2), mask.chunk(2)):
                model(input_ids=part, attention_mask=m, labels=part).loss.backward()
            rt.optimizer.step()
            rt.optimizer.zero_grad()
            for ad, (b0, g0) in zip(rt.adapters, before):
                if balance == "none":
                    assert (ad.expert_bias == 0).all()
                    continue
                load = sum(route(x.reshape(-1, 32), g0, experts_per_token=2, expert_size=8,
                                 max_active_rows=64, valid=m.reshape(-1) > 0, bias=b0).load
                           for x, m in zip(inputs[ad.index], mask.chunk(2)))
                torch.testing.assert_close(ad.expert_bias, b0 + rate * torch.sign(load.mean() - load))
        rt.close()
