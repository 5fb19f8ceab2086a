"""Generated keys (`MeftConfig.key_source="generated"`): values-only stores, traffic and updates that train
exactly as the stored [K | V] path does when its stored keys are the generated ones."""

import json

import pytest
import torch
from safetensors import safe_open

import meft
from meft.adapter.keys import GENERATOR, key_table
from meft.adapter.router import init_gate
from meft.adapter.saving import CONFIG_NAME, WEIGHTS_NAME
from tests.meft.adapter.test_wrap import D, adapter_state, batch, small_config, tiny_model, train


def stored_with_generated_keys(model):
    """A stored-keys wrapped model whose stored keys (and gates) are the generated ones."""
    rt = model.meft
    with torch.no_grad():
        for ad, s in zip(rt.adapters, rt.stores):
            keys = key_table(s.n_rows, seed=rt.config.seed, layer=ad.layer, d=D)  # [N, d]
            rows = s.weights.clone()
            rows[:, :D] = keys
            s.set_weights(rows)
            ad.gate.copy_(init_gate(keys, rt.config.expert_size))
    rt.stores_changed()
    return model


def twins(**kw):
    gen = meft.wrap(tiny_model("llama"), small_config(key_source="generated", **kw))
    old = stored_with_generated_keys(meft.wrap(tiny_model("llama"), small_config(key_source="stored", **kw)))
    return gen, old


def test_stores_hold_values_only():
    gen = meft.wrap(tiny_model("llama"), small_config(key_source="generated"))
    old = meft.wrap(tiny_model("llama"), small_config(key_source="stored"))
    for s in gen.meft.stores:
        assert s.width == D and s.weights.abs().max() == 0
    new_bytes, old_bytes = (sum(s.nbytes for s in m.meft.stores) for m in (gen, old))
    assert new_bytes <= 0.55 * old_bytes
    for m in (gen, old):
        m.meft.close()


@pytest.mark.parametrize("offload,token_rows,accum,wire", [
    (True, True, 1, "float32"), (True, False, 2, "float32"), (False, True, 1, "float32"),
    (True, False, 1, "bfloat16"), (True, True, 1, "bfloat16")])
def test_training_equals_stored_keys_training_given_the_same_keys(offload, token_rows, accum, wire):
    gen, old = twins(offload=offload, grad_accum_steps=accum, wire_dtype=wire)
    ids = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(gen(input_ids=ids).logits, old(input_ids=ids).logits, rtol=0, atol=0)
    for m in (gen, old):
        m.meft.token_rows = token_rows
    lg, lo = train(gen, ids, 3, accum), train(old, ids, 3, accum)
    assert lg == lo
    sg, so = adapter_state(gen), adapter_state(old)
    n = len(gen.meft.stores)
    for a, b in zip(sg[:n], so[:n]):
        assert a.abs().max() > 0
        assert torch.equal(a, b[:, D:])  # values bitwise
    for a, b in zip(sg[n:], so[n:]):
        assert torch.equal(a, b)  # router gates
    gen.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(gen(input_ids=ids).logits, old(input_ids=ids).logits)
    for m in (gen, old):
        m.meft.close()


def test_gradient_checkpointing_and_lookahead_equal_stored_keys():
    gen, old = twins(prefetch="lookahead")
    for m in (gen, old):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(3)
    assert train(gen, ids, 2) == train(old, ids, 2)
    n = len(gen.meft.stores)
    sg, so = adapter_state(gen), adapter_state(old)
    assert all(torch.equal(a, b[:, D:]) for a, b in zip(sg[:n], so[:n]))
    assert all(torch.equal(a, b) for a, b in zip(sg[n:], so[n:]))
    for m in (gen, old):
        m.meft.close()


def _trained(tmp_path, **kw):
    ids = batch()
    model = meft.wrap(tiny_model("llama"), small_config(**kw))
    train(model, ids, 3)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    info = meft.save_adapter(model, str(tmp_path), verbose=False)
    model.meft.close()
    return ids, want, info


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_values_folder_round_trip_half_size_and_loads_into_stored_keys(tmp_path):
    ids, want, info = _trained(tmp_path / "gen", key_source="generated")
    _, _, old_info = _trained(tmp_path / "old", key_source="stored")
    meta = json.loads((tmp_path / "gen" / CONFIG_NAME).read_text())
    assert meta["keys"] == {"source": "generated", "generator": GENERATOR, "seed": 0} and meta["row_width"] == D
    with safe_open(str(tmp_path / "gen" / WEIGHTS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == ["layers.0.router", "layers.0.values", "layers.1.router", "layers.1.values"]
    assert info["bytes"] <= 0.55 * old_info["bytes"]
    for cfg in (None, small_config(key_source="stored"), small_config(key_source="generated", offload=False)):
        fresh = meft.load_adapter(tiny_model("llama"), str(tmp_path / "gen"), cfg, verbose=False)
        if cfg is not None and not cfg.offload:  # the resident twin infers through the dense products
            torch.testing.assert_close(_logits(fresh, ids), want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(_logits(fresh, ids), want)
        fresh.meft.close()
    with pytest.raises(ValueError, match="seed: saved 0, given 5"):
        meft.load_adapter(tiny_model("llama"), str(tmp_path / "gen"), small_config(seed=5), verbose=False)


def test_old_format_folder_loads_exactly_whatever_key_source_says(tmp_path):
    """A folder as written before generated keys ([N, 2d] rows, no "keys" entry, no key_source field)."""
    ids, want, _ = _trained(tmp_path, key_source="stored")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["keys"], meta["config"]["key_source"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    for cfg in (None, small_config(key_source="generated"), small_config()):
        fresh = meft.load_adapter(tiny_model("llama"), str(tmp_path), cfg, verbose=False)
        assert not fresh.meft.config.generated_keys and fresh.meft.stores[0].width == 2 * D
        assert torch.equal(_logits(fresh, ids), want)
        fresh.meft.close()


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_metered_bytes_equal_the_analytic_count_on_both_paths(wire):
    """rows x row width x wire bytes each way: W = d with generated keys, 2d stored; the same rows cross."""
    gen, old = twins(wire_dtype=wire, grad_accum_steps=2)
    ids = batch(4)
    train(gen, ids, 2, accum=2), train(old, ids, 2, accum=2)
    esize = torch.empty((), dtype=getattr(torch, wire)).element_size()
    (gd, gu, grows, _), (od, ou, orows, _) = gen.meft.traffic_totals(), old.meft.traffic_totals()
    assert grows == orows > 0
    assert gd == gu == grows * D * esize and od == ou == orows * 2 * D * esize
    for m in (gen, old):
        m.meft.close()


@pytest.mark.parametrize("staleness", [0, 1])
def test_offloaded_training_equals_resident(staleness):
    ids = batch(4)
    off = meft.wrap(tiny_model("llama"), small_config(key_source="generated", staleness=staleness))
    res = meft.wrap(tiny_model("llama"), small_config(key_source="generated", staleness=staleness, offload=False))
    for m in (off, res):
        m.meft.token_rows = False
    torch.testing.assert_close(torch.tensor(train(off, ids, 3)), torch.tensor(train(res, ids, 3)), rtol=1e-5, atol=1e-6)
    for a, b in zip(adapter_state(off), adapter_state(res)):  # host kernel vs device AdamW: rounding
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for m in (off, res):
        m.meft.close()


def test_default_frozen_keys_are_generated_and_gates_aligned_with_them():
    model = meft.wrap(tiny_model("llama"), small_config())
    rt = model.meft
    assert rt.config.generated_keys and rt.stores[0].width == D
    for ad in rt.adapters:
        keys = key_table(256, seed=0, layer=ad.layer, d=D)
        torch.testing.assert_close(ad.gate.detach(), init_gate(keys, 8), rtol=0, atol=0)
    rt.close()
    assert not small_config(key_lr=None).generated_keys and small_config(key_lr=None).row_width(D) == 2 * D


def test_values_only_checkpoint_resumes_and_a_stored_one_names_the_key_source(tmp_path):
    from meft.train.checkpoint import CheckpointError, load_training_state, save_training_state

    ids = batch()
    gen = meft.wrap(tiny_model("llama"), small_config())
    train(gen, ids, 2)
    folder = save_training_state(tmp_path / "gen", 2, gen, data_state={}, extra={})
    again = meft.wrap(tiny_model("llama"), small_config())
    load_training_state(folder, again)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(gen), adapter_state(again)))
    assert train(gen, ids, 2) == train(again, ids, 2)  # resumed losses equal the uninterrupted run's
    old = meft.wrap(tiny_model("llama"), small_config(key_source="stored"))
    folder = save_training_state(tmp_path / "old", 1, old, data_state={}, extra={})
    with pytest.raises(CheckpointError, match="saved with key_source='stored'; fix: resume with key_source='stored'"):
        load_training_state(folder, meft.wrap(tiny_model("llama"), small_config()))
    for m in (gen, again, old):
        m.meft.close()
