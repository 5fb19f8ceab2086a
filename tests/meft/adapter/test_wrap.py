"""meft.wrap / unwrap on tiny models of every listed architecture; offloaded == resident training.

Also home of `tiny_model(arch)` (2 layers, tiny widths, built from a config: nothing from a hub) and
`small_config(...)`, used by the other meft test modules.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import meft
from meft.config import MeftConfig
from offload.resident import ResidentScheduler

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox",
         "falcon", "starcoder2"]
VOCAB, D = 96, 32
_COMMON = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, head_dim=8,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SPECIAL = {
    "gpt2": dict(n_embd=D, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                 eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": dict(hidden_size=D, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                max_position_embeddings=64, word_embed_proj_dim=D, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, dropout=0.0),
    "falcon": dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                   bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
}


def tiny_model(arch: str = "llama", seed: int = 0):
    """A 2-layer causal LM of `arch` with d=32, random weights (seeded), in eval mode."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **_SPECIAL.get(arch, _COMMON))
    return AutoModelForCausalLM.from_config(cfg).eval()


def small_config(**kw) -> MeftConfig:
    """256 rows x 8 per expert (32 experts), 2 experts per token, budget 64 rows, fp32 wire."""
    base = dict(adapter_rows=256, expert_size=8, experts_per_token=2, max_active_rows=64,
                wire_dtype="float32", adapter_lr=1e-2, router_lr=1e-2)
    base.update(kw)
    return MeftConfig(**base)


def batch(n: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def train(model, ids, steps: int, accum: int = 1) -> list[float]:
    """Plain loop: `accum` micro-batches (ids split along the batch) per optimizer step."""
    model.train()
    opt, losses = model.meft.optimizer, []
    for _ in range(steps):
        total = 0.0
        for part in ids.chunk(accum):
            loss = model(input_ids=part, labels=part).loss.div(accum)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def adapter_state(model) -> list[torch.Tensor]:
    rt = model.meft
    rt.sync_to_host()
    return [s.weights.clone() for s in rt.stores] + [ad.gate.detach().clone() for ad in rt.adapters]


@pytest.mark.parametrize("arch", ARCHS)
def test_wrap_starts_equal_then_trains(arch):
    model = tiny_model(arch)
    ids = batch()
    with torch.no_grad():
        base = model(ids).logits
    meft.wrap(model, small_config())
    with torch.no_grad():
        wrapped = model(ids).logits
    torch.testing.assert_close(wrapped, base, rtol=0, atol=0)
    assert len(model.meft.adapters) == 2
    losses = train(model, ids, 3)
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base)  # the adapter changed the function
    meft.unwrap(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    assert not hasattr(model, "meft")


@pytest.mark.parametrize("clip,staleness", [("layer", 0), ("global", 1)])
def test_offloaded_training_equals_resident(clip, staleness):
    """20 steps through TransferScheduler (rows on the host, thread engine) == all rows resident."""
    ids = batch(4, 10)
    runs = []
    for offload in (True, False):
        cfg = small_config(offload=offload, clip=clip, max_norm=0.5, staleness=staleness)
        model = meft.wrap(tiny_model("llama"), cfg)
        assert isinstance(model.meft.scheduler, ResidentScheduler) != offload
        losses = train(model, ids, 20)
        runs.append((losses, adapter_state(model)))
        model.meft.close()
    (l_off, w_off), (l_res, w_res) = runs
    assert l_off[-1] < l_off[0]
    torch.testing.assert_close(torch.tensor(l_off), torch.tensor(l_res), rtol=1e-5, atol=1e-6)
    for a, b in zip(w_off, w_res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_wrap_freezes_backbone_and_summary():
    model = tiny_model("llama")
    n_base = sum(p.numel() for p in model.parameters())
    meft.wrap(model, small_config(layers=[1]))
    rt = model.meft
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.1.mlp.gate"]
    s = rt.summary()
    assert s["layers"] == [1]
    assert s["device_resident"]["router_gates"]["params"] == 32 * D
    assert s["device_resident"]["backbone"] == {"params": n_base, "bytes": 4 * n_base, "trained": False}
    host = s["host_resident"]["adapter_rows"]  # frozen keys are generated: the rows are values, D wide
    assert host["params"] == 256 * D and host["bytes"] == 256 * (D * 12 + 8)
    assert s["trainable_params"] == 32 * D + 256 * D
    assert "adapter rows (1 x 256 x 32)" in rt.summary_table()


def test_wrap_errors():
    model = meft.wrap(tiny_model("llama"), small_config())
    with pytest.raises(ValueError, match="already wrapped"):
        meft.wrap(model, small_config())
    with pytest.raises(ValueError, match="layers = \\[5\\].*2 layers"):
        meft.wrap(tiny_model("llama"), small_config(layers=[5]))
    with pytest.raises(ValueError, match="not wrapped"):
        meft.unwrap(tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter_rows"):
        meft.wrap(tiny_model("llama"), small_config(adapter_rows=1 << 40))
    # refused for all layers at once, before any store is allocated; the message names the setting to change
    with pytest.raises(MemoryError, match=r"adapter_rows = 67108864 x 2 layers .* lower MeftConfig.adapter_rows"):
        meft.wrap(tiny_model("llama"), small_config(adapter_rows=1 << 26))
    # frozen keys (the default) and weight decay: the host AdamW would still shrink the keys
    with pytest.raises(ValueError, match=r"key_lr = 0.0: frozen keys need weight_decay = 0 \(got 0.01\)"):
        meft.wrap(tiny_model("llama"), small_config(weight_decay=0.01))
    meft.wrap(tiny_model("llama"), small_config(weight_decay=0.01, key_lr=None)).meft.close()


def test_failed_wrap_leaves_model_untouched():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="backbone = 'lomo' but no backbone parameter requires grad"):
        meft.wrap(model, small_config(backbone="lomo"))  # fails after the adapters were attached
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP" and not hasattr(model, "meft")
    assert not any(p.requires_grad for p in model.parameters())
    meft.wrap(model, small_config())  # and it can be wrapped afterwards


def test_optimizer_lr_scheduler_and_state_dict():
    ids = batch()
    model = meft.wrap(tiny_model("llama"), small_config(offload=False))
    opt = model.meft.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    train(model, ids, 1)
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-2)
    train(model, ids, 1)
    assert all(o.lr == pytest.approx(0.5e-2) for o in model.meft.sparse_optimizers)
    sd = copy.deepcopy(opt.state_dict())
    assert len(sd["adapter_rows"]) == 2 and len(sd["state"]) == 2
    before = adapter_state(model)
    twin = meft.wrap(tiny_model("llama"), small_config(offload=False))
    twin.meft.optimizer.load_state_dict(sd)
    with torch.no_grad():
        for a, b in zip(twin.meft.adapters, model.meft.adapters):
            a.gate.copy_(b.gate)
    for a, b in zip(adapter_state(twin), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    train(model, ids, 2)
    train(twin, ids, 2)  # same state -> same next steps (router moments restored too)
    for a, b in zip(adapter_state(twin), adapter_state(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_too_many_micro_batches_is_an_error():
    model = meft.wrap(tiny_model("llama"), small_config(grad_accum_steps=2))
    model.train()
    ids = batch()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="grad_accum_steps=2"):
        model(input_ids=ids, labels=ids)


def test_training_forward_outside_wrapped_model_is_an_error():
    model = meft.wrap(tiny_model("llama"), small_config())
    model.train()
    ffn = model.model.layers[0].mlp
    with pytest.raises(RuntimeError, match="did not go through the wrapped model's forward"):
        ffn(torch.randn(2, 5, D))  # one adapted FFN alone: no micro-batch opened
    with torch.no_grad():
        ffn(torch.randn(2, 5, D))  # fine without gradients
    # the decoder stack itself opens one (meft.lomo.lm_loss runs it without the LM head's forward)
    model.model(input_ids=batch()).last_hidden_state.sum().backward()
    model.meft.optimizer.step()


def test_generate_on_wrapped_model():
    model = meft.wrap(tiny_model("llama"), small_config())
    train(model, batch(), 2)
    model.eval()
    out = model.generate(batch(1, 4), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    assert all(p.grad is None for p in model.parameters())
    model.train()
    train(model, batch(), 1)  # training continues after generation


def test_backbone_lomo_builds_backbone_optimizer():
    model = meft.wrap(tiny_model("llama"), small_config(backbone="lomo", backbone_lr=1e-3))
    rt = model.meft
    assert isinstance(rt.backbone_optimizer, meft.Lomo)
    assert rt.summary()["device_resident"]["backbone"]["trained"]
    ids = batch()
    emb = model.get_input_embeddings().weight.detach().clone()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    rt.backbone_optimizer.step()
    rt.optimizer.step()
    assert not torch.equal(model.get_input_embeddings().weight, emb)  # updated in backward


def test_routing_stats_after_a_training_forward():
    model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=16))  # 2 experts of 8 rows fit
    assert model.meft.routing_stats() == {"distinct_experts": 0.0, "dropped_share": 0.0}
    ids = batch(4, 12)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    st = model.meft.routing_stats()
    assert st["distinct_experts"] == 2.0  # the budget keeps 2 experts per layer
    assert 0.0 < st["dropped_share"] < 1.0  # 48 tokens x 2 experts over 32 experts: most are dropped
    model.meft.optimizer.step()
    model.meft.close()


@pytest.mark.parametrize("offload", [True, False])
def test_keys_frozen_by_default_and_gates_aligned_with_them(offload):
    """Stored keys: key_lr=0 moves the values, never the keys (exactly); key_lr=None: keys train. Each gate
    starts as the unit-norm mean of its experts' keys. (Generated keys: tests/meft/adapter/test_generated_keys.py.)"""
    from meft.adapter.router import init_gate

    ids = batch(4, 12)
    for key_lr in (0.0, None):
        model = meft.wrap(tiny_model("llama"), small_config(offload=offload, key_lr=key_lr, key_source="stored"))
        rt = model.meft
        keys0 = [s.weights[:, :D].clone() for s in rt.stores]
        for ad, k in zip(rt.adapters, keys0):
            torch.testing.assert_close(ad.gate.detach(), init_gate(k, 8), rtol=0, atol=0)
        train(model, ids, 3)
        rt.sync_to_host()
        for s, k in zip(rt.stores, keys0):
            assert s.weights[:, D:].abs().max() > 0  # the values learned
            assert torch.equal(s.weights[:, :D], k) == (key_lr == 0.0)
        rt.close()
