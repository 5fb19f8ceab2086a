"""save_adapter / load_adapter: folder format, exact logits after loading into a fresh base, errors."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import meft
from meft.adapter.saving import CONFIG_NAME, WEIGHTS_NAME
from tests.meft.adapter.test_wrap import batch, small_config, tiny_model, train


@pytest.mark.parametrize("arch,offload,staleness", [("llama", True, 1), ("opt", False, 0)])
def test_round_trip_reproduces_logits(tmp_path, capsys, arch, offload, staleness):
    ids = batch()
    model = meft.wrap(tiny_model(arch), small_config(offload=offload, staleness=staleness, layers=[1]))
    train(model, ids, 3)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    info = meft.save_adapter(model, str(tmp_path))
    assert "saved meft adapter: 1 layers x 256 rows x 32" in capsys.readouterr().out  # values: keys generated
    assert info["params"] == 256 * 32 + 32 * 32 and info["layers"] == [1]
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format"] == "meft-adapter" and meta["config"]["adapter_rows"] == 256
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == ["layers.1.router", "layers.1.values"]
        values = f.get_tensor("layers.1.values")
    assert values.abs().max() > 0  # trained values were saved (they start at zero)
    fresh = tiny_model(arch)  # same seed: the same base weights
    meft.load_adapter(fresh, str(tmp_path))
    assert "loaded meft adapter" in capsys.readouterr().out
    with torch.no_grad():
        got = fresh(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_with_runtime_overrides_and_keep_training(tmp_path):
    ids = batch()
    model = meft.wrap(tiny_model("llama"), small_config())
    train(model, ids, 2)
    meft.save_adapter(model, str(tmp_path), verbose=False)
    # the router no faster than the rows: a gate 10x faster moves tokens off the rows that learned them
    overrides = small_config(offload=False, adapter_lr=1e-3, router_lr=1e-3)
    fresh = meft.load_adapter(tiny_model("llama"), str(tmp_path), overrides, verbose=False)
    assert fresh.meft.config.adapter_lr == 1e-3 and not fresh.meft.config.offload
    for a, b in zip(fresh.meft.stores, model.meft.stores):
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    losses = train(fresh, ids, 2)
    assert losses[-1] < losses[0]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not a meft adapter folder"):
        meft.load_adapter(tiny_model("llama"), str(tmp_path))
    model = meft.wrap(tiny_model("llama"), small_config())
    meft.save_adapter(model, str(tmp_path), verbose=False)
    with pytest.raises(ValueError, match="adapter_rows: saved 256, given 512"):
        meft.load_adapter(tiny_model("llama"), str(tmp_path), small_config(adapter_rows=512))
    other = tiny_model("gpt_neox")  # d=32 too but its own target paths work; width must match
    other.config.hidden_size = 48
    with pytest.raises(ValueError, match="row width 32"):  # values only: frozen keys are generated
        meft.load_adapter(other, str(tmp_path), verbose=False)
    assert not hasattr(other, "meft")  # left unwrapped
    with pytest.raises(ValueError, match="not wrapped"):
        meft.save_adapter(tiny_model("llama"), os.path.join(str(tmp_path), "x"))


def test_balance_bias_is_saved_and_routes_the_reloaded_model_the_same(tmp_path):
    """balance="bias": the per-expert bias chooses experts, so the adapter folder carries it and a reload
    reproduces the logits exactly."""
    ids = batch()
    model = meft.wrap(tiny_model("llama"), small_config(balance="bias", balance_rate=0.5, layers=[1]))
    train(model, ids, 3)
    assert model.meft.adapters[0].expert_bias.abs().max() > 0  # the bias moved
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    meft.save_adapter(model, str(tmp_path), verbose=False)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert "layers.1.expert_bias" in f.keys()
    fresh = tiny_model("llama")
    meft.load_adapter(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
