"""FFN targets per model type, the structural fallback, explicit patterns and the unknown-model error."""

import pytest
import torch
import torch.nn as nn

import meft
from meft.adapter.targets import TARGETS, find_targets, hidden_size_of
from tests.meft.adapter.test_wrap import ARCHS, D, batch, small_config, tiny_model, train

EXPECTED = {  # arch -> path of layer 1's FFN output module
    "llama": "model.layers.1.mlp", "mistral": "model.layers.1.mlp", "qwen2": "model.layers.1.mlp",
    "qwen3": "model.layers.1.mlp", "gemma": "model.layers.1.mlp", "gemma2": "model.layers.1.mlp",
    "phi3": "model.layers.1.mlp", "starcoder2": "model.layers.1.mlp", "gpt2": "transformer.h.1.mlp",
    "falcon": "transformer.h.1.mlp", "gpt_neox": "gpt_neox.layers.1.mlp", "opt": "model.decoder.layers.1.fc2",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_builtin_targets(arch):
    model = tiny_model(arch)
    assert model.config.model_type in TARGETS
    targets = find_targets(model)
    assert [t.layer for t in targets] == [0, 1]
    assert targets[1].path == EXPECTED[arch]
    assert targets[1].split == (arch == "opt")
    assert hidden_size_of(model) == D


def test_structural_fallback_for_unknown_model_type():
    model = tiny_model("qwen2")
    model.config.model_type = "mystery"
    targets = find_targets(model)
    assert [t.path for t in targets] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_explicit_target_module():
    model = tiny_model("llama")
    targets = find_targets(model, "model.layers.*.mlp.down_proj")
    assert targets[0].path == "model.layers.0.mlp.down_proj" and isinstance(targets[0].parent, nn.Module)
    t = find_targets(tiny_model("opt"), "model.decoder.layers.*.fc1>fc2")[0]
    assert (t.in_name, t.out_name, t.split) == ("fc1", "fc2", True)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mixer = nn.Linear(4, 4)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


def test_unknown_model_error_lists_what_was_found():
    with pytest.raises(ValueError) as e:
        find_targets(_Odd())
    msg = str(e.value)
    assert "blocks (len 2, layer children: ['attn', 'mixer'])" in msg
    assert "target_module=" in msg and "model.layers.*.mlp" in msg
    assert find_targets(_Odd(), "blocks.*.mixer")[1].path == "blocks.1.mixer"


def test_bad_pattern_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'model.blocks' is not a ModuleList"):
        find_targets(model, "model.blocks.*.mlp")
    with pytest.raises(ValueError, match="layer 0 has no 'ffn'.*'mlp'"):
        find_targets(model, "model.layers.*.ffn")


def test_wrap_with_explicit_target_on_inner_projection():
    """Adapter around down_proj with its input tapped at gate_proj (an inlined-FFN style target)."""
    model = tiny_model("llama")
    ids = batch()
    base = model(ids).logits.detach()
    meft.wrap(model, small_config(target_module="model.layers.*.mlp.gate_proj>down_proj"))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "SparseFFNAdapter"
    torch.testing.assert_close(model(ids).logits.detach(), base, rtol=0, atol=0)
    losses = train(model, ids, 3)
    assert losses[-1] < losses[0]
