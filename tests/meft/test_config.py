"""MeftConfig: defaults valid, help per field, JSON round trip, every bad field gets its error."""

import dataclasses
import json

import pytest
import torch

from meft.config import MeftConfig

BAD = [  # (field, bad value, words the fix must contain)
    ("sparse_background", "web", "one of 'pydoc', 'questions'"),
    ("adapter_rows", 0, "positive int"),
    ("adapter_rows", 10.5, "positive int"),
    ("expert_size", 0, "positive int"),
    ("expert_size", 33, "must divide adapter_rows"),
    ("experts_per_token", 0, "positive int"),
    ("experts_per_token", 10_000, "at most the number of experts"),
    ("max_active_rows", 0, "multiple of expert_size"),
    ("max_active_rows", 8, "room for one expert"),
    ("active_per_token", 0, "None (off) or a positive int"),
    ("scale", "big", "finite number"),
    ("scale", float("nan"), "finite number"),
    ("layers", "some", "'all', a list"),
    ("layers", [], "'all', a list"),
    ("layers", [1, 1], "distinct"),
    ("layers", 0, "stride"),
    ("layers", [-1], "'all', a list"),
    ("target_module", "model.layers.mlp", "one '*'"),
    ("wire_dtype", "int8", "'bfloat16'"),
    ("wire_dtype", "auto", "'bfloat16'"),
    ("wire_dtype", "float16", "'bfloat16', 'float32'"),  # the engines move bf16 or fp32 only
    ("compute_dtype", "float64", "'auto'"),
    ("state_dtype", "float16", "'float32', 'bfloat16'"),
    ("backbone", "full", "'frozen', 'lomo', 'adalomo'"),
    ("backbone_lr", -1.0, ">= 0"),
    ("adapter_lr", -1e-3, ">= 0"),
    ("adapter_lr", "fast", ">= 0"),
    ("router_lr", float("inf"), ">= 0"),
    ("weight_decay", -0.1, ">= 0"),
    ("staleness", 2, "0, 1"),
    ("staleness", True, "0, 1"),
    ("clip", "norm", "'none', 'layer', 'global'"),
    ("max_norm", 0.0, "> 0"),
    ("prefetch", "always", "'none', 'lookahead'"),
    ("grad_accum_steps", 0, "positive int"),
    ("offload", "yes", "True, False"),
    ("copy_timing", 1, "True, False"),
    ("compile_router", "yes", "False, True"),
    ("row_optimizer", "adam", "'adamw', 'sgd'"),
    ("inference_rows", "gpu", "'auto', 'resident', 'fetch'"),
    ("fetch_mode", "mapped", "'staged', 'zero_copy'"),
    ("seed", -1, ">= 0"),
    ("key_lr", 1e-4, "per-column lr"),
    ("key_lr", "slow", "0.0 (frozen keys) or None"),
    ("key_source", "keys", "'auto', 'generated', 'stored'"),
    ("balance", "aux_loss", "'none', 'bias'"),
    ("balance_rate", -1e-3, ">= 0"),
    ("sparse_update", -1, "0 (off) or a positive int"),
    ("sparse_background_tokens", 0, "a positive int"),
    ("locality_weight", -0.1, "0 = off"),
    ("locality_weight", float("nan"), ">= 0"),
    ("locality_margin", -1.0, "a norm >= 0"),
    ("locality_background", 0, "questions per micro-batch"),
    ("locality_background", 2.5, "a positive int"),
]


def test_defaults_valid_and_sized_for_smollm2():
    c = MeftConfig().validate()
    assert c.n_experts == 256 and c.budget_experts == 64  # 4*sqrt(4096) experts, 1024-row budget
    assert c.layer_indices(30) == list(range(30))
    assert MeftConfig(layers=3).layer_indices(8) == [0, 3, 6]
    assert MeftConfig(layers=[5, 1]).layer_indices(8) == [1, 5]


def test_every_field_has_help():
    helps = MeftConfig.help()
    assert set(helps) == {f.name for f in dataclasses.fields(MeftConfig)}
    assert all(len(h) > 20 for h in helps.values())


def test_bad_values_cover_every_field():
    checked = {f for f, _, _ in BAD}
    assert checked == {f.name for f in dataclasses.fields(MeftConfig)}


@pytest.mark.parametrize("field,value,fix", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_each_bad_field_is_reported(field, value, fix):
    with pytest.raises(ValueError) as e:
        MeftConfig(**{field: value}).validate()
    msg = str(e.value)
    assert f"{field} = {value!r}" in msg and fix in msg
    assert "(1 field(s))" in msg  # only the bad field is reported


def test_all_errors_reported_at_once():
    with pytest.raises(ValueError) as e:
        MeftConfig(adapter_rows=0, clip="x", wire_dtype="int4", seed=-2).validate()
    msg = str(e.value)
    assert "(4 field(s))" in msg
    for name in ("adapter_rows", "clip", "wire_dtype", "seed"):
        assert f"\n  {name} = " in msg


def test_json_round_trip(tmp_path):
    c = MeftConfig(adapter_rows=512, layers=[0, 2], wire_dtype=torch.float32, state_dtype="torch.bfloat16",
                   active_per_token=8, prefetch="lookahead", target_module="model.layers.*.mlp")
    assert c.wire_dtype == "float32"  # dtypes are stored as strings
    d = c.to_dict()
    assert d["wire_dtype"] == "float32" and d["state_dtype"] == "bfloat16" and d["compute_dtype"] == "auto"
    assert MeftConfig.from_dict(d).to_dict() == d
    text = c.to_json()
    assert json.loads(text) == d
    assert MeftConfig.from_json(text).to_dict() == d
    path = tmp_path / "c.json"
    c.to_json(str(path))
    assert MeftConfig.from_json(str(path)).to_dict() == d


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="unknown MeftConfig field.*'rows'"):
        MeftConfig.from_dict({"rows": 3})


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match="layers = \\[0, 9\\].*model has 4 layers"):
        MeftConfig(layers=[0, 9]).layer_indices(4)
