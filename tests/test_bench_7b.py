"""experiments/bench_7b.py on the CPU: the tiny shapes of both 7B configs run every method end to end and
the JSON carries every key, with the GPU-only ones null (never made up)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from experiments import bench_7b  # noqa: E402

KEYS = ("tokens_per_s", "meft_vs_lora16", "gpu_busy_fraction", "peak_gpu_gib", "plan_gpu_gib", "host_ram_gib",
        "plan_host_gib", "exposed_fetch_ms", "cpu_update_ms", "launches_per_layer")


@pytest.fixture(scope="module")
def result():
    return bench_7b.main(["--warmup", "1", "--steps", "2", "--json"])


def test_every_shape_and_method_runs(result):
    assert set(result["shapes"]) == {"llama-2-7b", "mistral-7b"}
    assert result["gpu_cap_gib"] is None and result["warmup"] == 1 and result["timed_steps"] == 2
    for name, r in result["shapes"].items():
        assert r["errors"] == {}, name
        assert r["layers"] == 2 and r["hidden_size"] == 64
        for key in KEYS:
            assert key in r, (name, key)
        assert all(v > 0 for v in r["tokens_per_s"].values())
        assert set(r["meft_vs_lora16"]) == {"meft", "meft_zc"}
        assert all(v > 0 for v in r["meft_vs_lora16"].values())


def test_gpu_keys_are_null_on_cpu(result):
    for r in result["shapes"].values():
        assert set(r["gpu_busy_fraction"].values()) == {None}
        assert set(r["peak_gpu_gib"].values()) == {None}


def test_host_figures_are_measured(result):
    for r in result["shapes"].values():
        for m in ("meft", "meft_zc"):
            assert r["host_ram_gib"][m]["stores"] > 0 and r["plan_host_gib"][m] > 0
            assert r["plan_host_gib"][m] >= r["host_ram_gib"][m]["stores"]  # stores + staging + pending grads
            assert r["exposed_fetch_ms"][m] >= 0 and r["cpu_update_ms"][m] > 0
            assert r["launches_per_layer"][m] > 0  # aten ops the adapter adds, counted by a dispatch mode


def test_json_is_the_last_line(capsys):
    bench_7b.main(["--shapes", "mistral-7b", "--warmup", "1", "--steps", "1", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out["shapes"]) == ["mistral-7b"]
