"""`meft plan --gpus N --nodes M`: per-GPU device memory, host RAM per node (one copy of the stores per node,
per-rank staging / pending gradients / exchange buffers), the collective bytes per step, and clear errors."""

import subprocess
import sys

import pytest

from meft.config import MeftConfig
from meft.plan.planner import PlanOptions, collective_bytes, estimate, format_plan
from tests.meft.plan.test_planner import SMALL, _hf_config

OPTS = dict(model="tiny", seq=32, batch=2, dtype="float32", gpu_mem="1GiB", host_mem="64GiB", search=False)


def test_host_ram_per_node_counts_the_stores_once_and_the_rest_per_rank():
    hf, cfg = _hf_config(), MeftConfig(**SMALL)
    one = estimate(PlanOptions(**OPTS), cfg, hf_config=hf)
    four = estimate(PlanOptions(**OPTS, gpus=4, nodes=2), cfg, hf_config=hf)
    h1, h4 = one["host_ram"], four["host_ram"]
    assert h4["stores"] == h1["stores"] > 0  # one copy per node, whatever the ranks
    assert h4["staging"] == h1["staging"] and h4["pending_grads"] == h1["pending_grads"]
    assert h1["exchange"] == 0 < h4["exchange"]
    assert h4["total"] == h4["stores"] + 4 * (h4["staging"] + h4["pending_grads"] + h4["exchange"])
    assert four["gpu_total"] == one["gpu_total"]  # per GPU: same step, same micro-batch (fp32: no extra copy)
    text = format_plan(four)
    assert "2 node(s) x 4 GPU(s) = 8 ranks" in text and "host RAM per node" in text and "collective" in text


@pytest.mark.parametrize("key_source, width", [("generated", 1), ("stored", 2)])  # row width in units of d
def test_collective_bytes_are_ids_plus_union_rows_times_width_times_wire_bytes(key_source, width):
    d, layers = 64, 2
    cfg = MeftConfig(**SMALL, wire_dtype="bfloat16", key_source=key_source)  # budget 64 rows of 256
    c = collective_bytes(cfg, layers, d, world=2)
    assert c["union_rows"] == 128 and c["analytic_min"] == layers * 128 * (8 + width * d * 2)
    assert c["as_sent"] == layers * (8 * (1 + 64) + 128 * width * d * 4)  # fp32 block
    assert collective_bytes(cfg, layers, d, world=8)["union_rows"] == 256  # bounded by adapter_rows
    assert collective_bytes(cfg, layers, d, world=1)["analytic_min"] == 0


def test_trained_bf16_backbone_adds_the_fp32_gradient_of_its_all_reduce():
    hf, cfg = _hf_config(), MeftConfig(**SMALL, backbone="lomo")
    opts = dict(OPTS, dtype="bfloat16")
    one = estimate(PlanOptions(**opts), cfg, hf_config=hf)
    two = estimate(PlanOptions(**opts, gpus=2), cfg, hf_config=hf)
    extra = two["margin"]["allreduce_fp32_grad"]
    assert extra == 4 * hf.hidden_size * hf.vocab_size and two["gpu_total"] == one["gpu_total"] + extra


@pytest.mark.parametrize("kw,field", [({"gpus": 0}, "--gpus"), ({"nodes": -1}, "--nodes"),
                                      ({"gpus": 2, "method": "dense"}, "--method")])
def test_bad_distributed_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        estimate(PlanOptions(**{**OPTS, **kw}), MeftConfig(**SMALL), hf_config=_hf_config())


def test_plan_cli_help_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "meft.cli.main", "plan", *a], capture_output=True,
                                    text=True, timeout=300)
    helped = run("--help")
    assert helped.returncode == 0 and "--gpus" in helped.stdout and "--nodes" in helped.stdout
    assert "one copy of the stores per node" in " ".join(helped.stdout.split())
    bad = run("--gpus", "0")
    assert bad.returncode == 2 and "--gpus = 0" in bad.stderr and "Traceback" not in bad.stderr
