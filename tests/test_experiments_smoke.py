"""Smoke runs of experiments/knowledge/ and experiments/bench_step.py on a tiny local Llama: every
method trains on the same tokens, the device-memory accounting adds up, the dense baseline starts equal
to the base model, the report compares methods under one stated lr selection rule without verdicts,
the capacity protocol measures forgetting, sweeps before it carries the chosen lr and ends its report
with the JSON summary, and bench_step's JSON ends with the two ratios. Seconds, not minutes."""

import dataclasses
import json

import pytest
import torch

from experiments import bench_step, quickstart_sweep
from experiments.knowledge import cli as knowledge
from experiments.knowledge.capacity import RULE as CAPACITY_RULE
from experiments.knowledge.capacity import CapacityPlan
from experiments.knowledge.capacity import summarize as capacity_summary
from experiments.knowledge.methods import METHODS, build_trainer, device_memory
from experiments.knowledge.report import RULE, format_capacity_report, format_report, summarize
from experiments.knowledge.runner import RunSpec, eval_base, run_one
from tests.meft.data.test_records import tiny_model, tiny_tokenizer

SMALL = dict(n_facts=5, steps=3, batch_size=4, rows=64, max_active_rows=32, expert_size=16, eval_limit=4,
             max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_exp")
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def results(tiny_dir):
    return {m: run_one(RunSpec(method=m, model=tiny_dir, **SMALL)) for m in METHODS}


def test_every_method_trains_on_the_same_tokens(results):
    tokens = {m: (r["labelled_tokens"], r["input_tokens"]) for m, r in results.items()}
    assert len(set(tokens.values())) == 1, tokens
    for m, r in results.items():
        assert r["labelled_tokens"] > 0 and r["step_s_median"] > 0, m
        assert {"trained", "held_out"} <= set(r["eval"]), m
        assert 0.0 <= r["eval"]["trained"]["exact_match"] <= 1.0


def test_device_memory_adds_up(results):
    for m, r in results.items():
        dm = r["device"]
        assert dm["total"] == dm["weights"] + dm["grads"] + dm["optimizer"] + dm["active_rows"], m
        assert (dm["active_rows"] > 0) == m.startswith("meft"), m
        assert (r["host_stores_bytes"] > 0) == m.startswith("meft"), m
    # frozen-backbone MEFT keeps only router gates (+ rows) on the device; LoRA r=64 trains more there
    assert results["meft"]["device"]["optimizer"] < results["lora64"]["device"]["optimizer"]
    # full fine-tuning: fused AdaLomo keeps one gradient alive (the largest parameter), not all of them
    weights = results["full_adalomo"]["device"]["weights"]
    assert 0 < results["full_adalomo"]["device"]["grads"] < weights


def test_dense_adapter_starts_equal_to_base(tiny_dir):
    from meft.pretrained import load_model

    base, tok = load_model(tiny_dir)
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model, _ = load_model(tiny_dir)
    tr = build_trainer("dense", model, rows=64)
    with torch.no_grad():
        got = tr.model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert all(p.requires_grad for p in tr.trained) and len(tr.trained) == 2 * 2  # K, V per layer
    assert device_memory(tr)["grads"] == sum(p.numel() * 4 for p in tr.trained)


def test_report_compares_methods_under_one_rule_without_verdicts(results):
    rows = [dict(r, spec=dict(r["spec"])) for r in results.values()]
    text, summary = format_report(rows, command="test")
    assert "- LoRA r=8 (lr 0.001" in text and "LoRA r=64" in text and "dense adapter (lr" in text
    assert set(summary["fictional"]) == set(METHODS)
    # one stated rule, the same number of tuning trials for every AdamW-trained method; numbers, no verdicts
    assert RULE in text and "| 1 of 1 |" in text and "[1]" not in text
    assert "HIT" not in text and "MISSED" not in text and "target" not in text.lower()
    assert {v["trials"] for v in summary["fictional"].values()} == {1, None}


def test_lr_sweep_specs():
    args = knowledge.parse_args(["--methods", "meft", "lora8", "full_adalomo", "--lrs", "1e-3", "1e-2",
                                 "--lr-for", "lora8=3e-3", "--seeds", "0", "1", "--datasets", "fictional"])
    got = sorted((s.method, s.seed, s.lr) for s in knowledge.specs_for(args))
    assert got == sorted([("base", 0, 1e-3)] + [("meft", sd, lr) for sd in (0, 1) for lr in (1e-3, 1e-2)]
                         + [("lora8", sd, 3e-3) for sd in (0, 1)] + [("full_adalomo", sd, 1e-3) for sd in (0, 1)])
    args = knowledge.parse_args(["--methods", "meft", "lora8", "--router-lr", "1e-4", "--datasets", "fictional",
                                 "--seeds", "0"])
    assert {s.method: s.router_lr for s in knowledge.specs_for(args)} == {"base": None, "meft": 1e-4, "lora8": None}
    with pytest.raises(SystemExit):  # full_adalomo has no AdamW lr: refused, not silently ignored
        knowledge.parse_args(["--methods", "full_adalomo", "--lr-for", "full_adalomo=1e-2"])


def test_report_compares_each_method_at_its_best_lr_on_the_sweep_seed(results):
    def run(seed, lr, em_trained):
        r = json.loads(json.dumps(results["meft"]))
        r["spec"].update(seed=seed, lr=lr)
        r["eval"]["trained"]["exact_match"] = em_trained
        return r
    # seed 0 ran at both lrs and chooses 1e-2; seed 1 ran only there; the table reports the mean of both
    rows = [run(0, 1e-3, 0.2), run(0, 1e-2, 0.6), run(1, 1e-2, 0.4)]
    got = summarize(rows)["fictional"]["meft"]
    assert got["lr"] == 1e-2 and got["seeds"] == [0, 1] and got["em_trained"] == pytest.approx(0.5)
    assert set(got["by_lr"]) == {1e-3, 1e-2}
    rows[0]["eval"]["trained"]["exact_match"] = 0.6  # a tie goes to the smaller lr
    assert summarize(rows)["fictional"]["meft"]["lr"] == 1e-3
    rows[2]["spec"]["router_lr"] = 1e-4  # its own router lr: reported as a method of its own
    assert set(summarize(rows)["fictional"]) == {"meft", "meft (router lr 0.0001)"}


def test_report_footnotes_methods_with_fewer_tuning_trials(results):
    def run(method, lr):
        r = json.loads(json.dumps(results[method]))
        r["spec"]["lr"] = lr
        return r
    rows = [run("meft", 1e-3), run("meft", 1e-2), run("lora8", 1e-3)]
    got = summarize(rows)["fictional"]
    assert (got["meft"]["trials"], got["lora8"]["trials"], got["lora8"]["grid_size"]) == (2, 1, 2)
    text, _ = format_report(rows, command="test")
    assert "| 2 of 2 |" in text and "| 1 of 2 [1] |" in text
    assert "[1] lora8: fewer tuning trials, 1 of the 2 grid lrs (not run at 0.01)" in text


def test_sweep_plot_writes_png(results, tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.knowledge.plot import plot_sweep

    path = plot_sweep(list(results.values()), str(tmp_path / "sweep.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_step_json_ends_with_ratios(tiny_dir, capsys):
    bench_step.main(["--json", "--model", tiny_dir, "--batch-size", "4", "--rows", "64", "--max-active-rows",
                     "32", "--expert-size", "16", "--rounds", "1", "--warmup", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(res)[-2:] == ["meft_vs_lora_step_ratio", "traffic_vs_meft_original"]
    assert 0 < res["traffic_vs_meft_original"] < 1 and res["meft_vs_lora_step_ratio"] > 0
    assert res["traffic"]["measured_equals_analytic"]


def test_bench_pipeline_quick_json_on_tiny_model(tiny, capsys):
    from experiments import bench_pipeline

    bench_pipeline.main(["--quick", "--json", "--model", str(tiny / "model"), "--new-tokens", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(res)[-5:] == ["forward_syncs_per_layer", "step_syncs", "exposed_fetch_fraction",
                              "bytes_vs_analytic", "generate_tokens_per_s"]
    assert res["forward_syncs_per_layer"] == 0 and res["backward_syncs_adapter_path"] == 0
    assert res["bytes_vs_analytic"]["accum_1"] == pytest.approx(1.0)
    assert res["bytes_vs_analytic"]["accum_2"] >= 1.0 and res["exposed_fetch_fraction"] >= 0
    assert all(v > 0 for v in res["generate_tokens_per_s"].values())


@pytest.fixture(scope="module")
def retention_file(tiny_dir, tmp_path_factory):
    """A 3-question retention set for the tiny model (the real one keeps the base model's correct answers)."""
    qs = [{"prompt": f"Where was Kalo {i} born?", "completion": "Ravenburg", "answers": ["Ravenburg"],
           "subject": f"Kalo {i}", "relation": "birthplace", "base_prediction": "Ravenburg"} for i in range(3)]
    path = tmp_path_factory.mktemp("retention") / "retention.json"
    path.write_text(json.dumps({"model": tiny_dir, "chat": True, "max_new_tokens": 4, "questions": qs}))
    return str(path)


CAPACITY_TEMPLATE = dict(SMALL, forgetting=True, retention_limit=3, ppl_texts=2, ppl_tokens=32)


@pytest.fixture(scope="module")
def capacity_runs(tiny_dir, retention_file):
    """Real base / meft / lora8 runs with forgetting measured (fictional, 5 facts)."""
    kw = dict(CAPACITY_TEMPLATE, model=tiny_dir, retention_file=retention_file)
    base = eval_base(RunSpec(method="base", **kw))
    return base, {m: run_one(RunSpec(method=m, **kw)) for m in ("meft", "lora8")}


def test_runs_measure_forgetting(capacity_runs):
    base, runs = capacity_runs
    for r in [base, *runs.values()]:
        f = r["forgetting"]
        assert f["retention"]["n"] == 3 and 0 <= f["retention"]["contains"] <= 1
        assert f["ppl"]["n_texts"] == 2 and f["ppl"]["perplexity"] > 1 and f["ppl"]["n_tokens"] <= 2 * 32
        assert f["ppl"]["texts_sha"] == base["forgetting"]["ppl"]["texts_sha"]


def test_replay_joins_every_methods_data_and_the_plan_counts_it(tiny_dir, retention_file):
    """`--replay N`: the base model's answers join the training records (same for every method), none about a
    retention-set country, and the capacity plan's epochs count them."""
    kw = dict(CAPACITY_TEMPLATE, model=tiny_dir, retention_file=retention_file, replay=6)
    runs = {m: run_one(RunSpec(method=m, **kw)) for m in ("meft", "lora8")}
    assert runs["meft"]["n_replayed"] == runs["lora8"]["n_replayed"] > 0
    assert runs["meft"]["input_tokens"] == runs["lora8"]["input_tokens"]
    assert runs["meft"]["epochs"] == pytest.approx(3 * 4 / (15 + runs["meft"]["n_replayed"]))
    template = {k: v for k, v in CAPACITY_TEMPLATE.items() if k not in ("n_facts", "steps", "forgetting")}
    plan = CapacityPlan(ns=[5], methods=["meft"], lrs={"meft": [1e-2]}, seeds=[0], epochs=2,
                        template=dict(template, replay=6))
    assert plan.steps(5) == 2 * 6  # (15 records + 6 replayed) / batch 4 -> 6 batches per epoch


def test_capacity_sweeps_then_carries_the_chosen_lr(capacity_runs, tiny_dir, retention_file, tmp_path):
    base, runs = capacity_runs
    template = {k: v for k, v in CAPACITY_TEMPLATE.items() if k not in ("n_facts", "steps", "forgetting")}
    plan = CapacityPlan(ns=[5, 10], methods=["meft", "lora8"], lrs={"meft": [1e-3, 1e-2], "lora8": [1e-4, 1e-3]},
                        seeds=[0], epochs=2, template=dict(template, model=tiny_dir, retention_file=retention_file),
                        router_lr=1e-3)
    assert [s.steps for s in plan.base_specs()] == [2 * 4, 2 * 8]  # 15 / 30 records, batch 4
    assert all(s.n_facts == 5 and s.forgetting for s in plan.sweep_specs())

    def fake(spec, held_out, retained=None):
        r = json.loads(json.dumps(base if spec.method == "base" else runs[spec.method]))
        r["spec"] = dataclasses.asdict(spec)
        r["eval"]["held_out"]["exact_match"] = held_out
        if retained is not None:
            r["forgetting"]["retention"]["contains"] = retained
        return r
    rows = [fake(s, 0.0, 1.0) for s in plan.base_specs()]
    assert plan.carried_specs(rows) == []  # no lr before the sweep is done
    held = {("meft", 1e-3): 0.2, ("meft", 1e-2): 0.6, ("lora8", 1e-4): 0.5, ("lora8", 1e-3): 0.5}
    rows += [fake(s, held[s.method, s.lr], 0.5) for s in plan.sweep_specs()]
    chosen = plan.chosen_lrs(rows)
    assert (chosen["meft"]["lr"], chosen["lora8"]["lr"]) == (1e-2, 1e-4)  # best held-out; a tie: smaller lr
    carried = plan.carried_specs(rows)
    assert [(s.method, s.n_facts, s.lr) for s in carried] == [("meft", 10, 1e-2), ("lora8", 10, 1e-4)]
    summary = capacity_summary(plan, rows)
    assert summary["json"]["capacity_n"] == 5 and len(summary["missing"]) == 2
    rows += [fake(carried[0], 0.7, 0.9)]
    summary = capacity_summary(plan, rows)
    j = summary["json"]
    assert j["capacity_n"] == 5 and j["meft_minus_lora8_heldout"] == pytest.approx(10.0)
    assert j["meft_retention_drop"] == pytest.approx(50.0) and j["lora8_retention_drop"] == pytest.approx(50.0)
    assert j["meft_ppl_increase"] is not None
    assert summary["missing"] == ["lora8 N=10 lr=0.0001 seed=0: not run yet"]
    text = format_capacity_report(summary, command="test")
    assert CAPACITY_RULE in text and "lora8 N=10 lr=0.0001 seed=0: not run yet" in text
    assert "HIT" not in text and "MISSED" not in text
    rows += [fake(carried[1], 0.4, 0.8)]
    j = capacity_summary(plan, rows)["json"]
    assert j["capacity_n"] == 10 and j["meft_minus_lora8_heldout"] == pytest.approx(30.0) and j["missing"] == []
    assert j["lora8_retention_drop"] == pytest.approx(20.0)


def test_capacity_plots_write_pngs(capacity_runs, tiny_dir, retention_file, tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.knowledge.plot import plot_capacity, plot_forgetting

    base, runs = capacity_runs
    plan = CapacityPlan(ns=[5], methods=["meft", "lora8"], lrs={"meft": [1e-3], "lora8": [1e-3]}, seeds=[0],
                        epochs=0.75, template=dict(batch_size=4, rows=64, max_active_rows=32, expert_size=16,
                                                   eval_limit=4, max_new_tokens=4, model=tiny_dir,
                                                   retention_file=retention_file, retention_limit=3, ppl_texts=2,
                                                   ppl_tokens=32), router_lr=None)
    assert plan.steps(5) == 3  # the fixture runs' steps: their specs are this plan's cells
    rows = [base] + list(runs.values())
    summary = capacity_summary(plan, rows)
    assert summary["missing"] == [] and summary["json"]["capacity_n"] == 5
    for draw in (plot_capacity, plot_forgetting):
        path = draw(summary, str(tmp_path / f"{draw.__name__}.png"))
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_capacity_presets():
    args = knowledge.parse_args(["--capacity", "--quick", "--ns", "7", "--lr-for", "meft=1e-3,1e-2"])
    assert args.ns == [7] and args.epochs == 1.0 and args.rows == 512 and args.out.endswith("capacity_quick.jsonl")
    plan = knowledge.capacity_plan(args)
    assert plan.lrs["meft"] == [1e-3, 1e-2] and plan.lrs["lora8"] == [1e-3, 1e-2] and plan.router_lr is not None
    assert len(knowledge.capacity_plan(knowledge.parse_args(["--capacity"])).lrs["lora8"]) == 3
    args = knowledge.parse_args(["--capacity"])
    assert args.ns == [300, 1000, 3000] and args.epochs >= 4 and args.seeds == [0]
    assert [knowledge.capacity_plan(args).steps(n) for n in args.ns] == [228, 752, 2252]
    with pytest.raises(SystemExit):  # a grid per method only where there is a sweep
        knowledge.parse_args(["--lr-for", "meft=1e-3,1e-2"])


def test_parallel_cells_append_every_result_and_queue_what_becomes_runnable(tiny_dir, tmp_path):
    """`--jobs 2`: two cells in their own processes at once; a spec `more` releases after the first result
    (as the capacity plan releases carried cells) runs too; each result is appended once, by the parent."""
    specs = [RunSpec(method="base", model=tiny_dir, **dict(SMALL, n_facts=n)) for n in (5, 6)]
    late = RunSpec(method="base", model=tiny_dir, **dict(SMALL, n_facts=7))
    out = tmp_path / "cells.jsonl"
    asked = []

    def more(results):
        asked.append(len(results))
        return [late] if results else []
    knowledge._run(specs, out, jobs=2, more=more)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert sorted(r["spec"]["n_facts"] for r in rows) == [5, 6, 7] and not any("error" in r for r in rows)
    assert asked[0] == 0 and asked[-1] == 3  # asked before any result, and after every one
    knowledge._run(specs + [late], out, jobs=2)  # resume: nothing left to run, nothing appended
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_device_cuda_refused_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        knowledge.parse_args(["--capacity", "--device", "cuda"])
    assert "--device cuda" in capsys.readouterr().err
    assert knowledge.parse_args(["--capacity", "--report", "--device", "cuda"]).device == "cuda"  # reading is fine
    assert dataclasses.asdict(knowledge.capacity_plan(knowledge.parse_args(["--capacity"])).spec(
        "meft", 300, 0, 1e-2))["device"] == "cpu"


def test_bench_distributed_quick_json_ends_with_the_three_verdicts(capsys):
    """1 vs 2 gloo ranks under torchrun on a tiny config-built Llama: 2 ranks equal 1, the exchange is the
    analytic minimum (fp32 wire), one host copy of the stores per node; the JSON ends with the three keys."""
    from experiments import bench_distributed

    bench_distributed.main(["--quick", "--json", "--hidden", "64", "--rows", "512", "--steps", "1", "--seq", "16",
                            "--batch", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(res)[-3:] == ["exchange_bytes_vs_analytic", "host_ram_copies_per_node", "two_rank_equal_to_one"]
    assert res["two_rank_equal_to_one"] is True
    assert 0.9 < res["exchange_bytes_vs_analytic"] < 1.1
    assert res["host_ram_copies_per_node"] == 1
    assert res["exchanges_per_step"] == 2  # one per adapted layer


def test_bench_cpu_step_json_on_tiny_model(tiny, capsys):
    from experiments import bench_cpu_step

    bench_cpu_step.main(["--json", "--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"),
                         "--eval-data", str(tiny / "train.jsonl"), "--rounds", "1", "--eval-rounds", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["step_median_s"]) == set(bench_cpu_step.VARIANTS)
    assert all(v > 0 for v in res["step_median_s"].values()) and res["scored_questions"] == 24
    assert set(res["scoring_median_s"]) == {"per-token rows (default)", "gathered rows, dense products"}


def test_quickstart_sweep_report_means_over_seeds(tmp_path, capsys):
    """experiments/quickstart_sweep.py --report: one row per run, then each setting's mean over its seeds."""
    runs = [("lr2e-2_seed0", 0.9, 0.8, 0.6), ("lr2e-2_seed1", 0.7, 0.6, 0.5), ("lr1e-2_seed0", 0.5, 0.4, 0.7)]
    out = tmp_path / "sweep.jsonl"
    out.write_text("".join(json.dumps({"name": n, "args": [], "rc": 0, "trained": t, "held_out": h, "kept": k,
                                       "train_s": 1.0, "last_loss": 0.1}) + "\n" for n, t, h, k in runs))
    assert quickstart_sweep.main(["--report", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| lr2e-2 | 2 | 80.0 | 70.0 | 55.0 |" in text and "| lr1e-2 | 1 | 50.0 | 40.0 | 70.0 |" in text
    png = tmp_path / "tradeoff.png"
    assert quickstart_sweep.main(["--report", "--out", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # learned vs kept drawn
    with pytest.raises(SystemExit):
        quickstart_sweep.main(["--out", str(out), "--only", "lr9"])  # an unknown variant is refused by name


def test_forgetting_anatomy_scores_every_part_once(tiny_dir, tmp_path):
    """experiments/forgetting_anatomy.py on a tiny model and an adapter with nonzero values: one line per variant
    (nowhere, everywhere, prompt, answer, each layer range, the sentence prefix), each score a percentage, and
    resumable (a second run adds nothing)."""
    import meft
    from experiments import forgetting_anatomy

    model, _ = meft.load_model(tiny_dir)
    meft.wrap(model, meft.MeftConfig(adapter_rows=64, expert_size=8, max_active_rows=32, wire_dtype="float32"))
    for store in model.meft.stores:
        store.set_weights(torch.randn(store.weights.shape, generator=torch.Generator().manual_seed(0)))
    meft.save_adapter(model, str(tmp_path / "adapter"), verbose=False)
    out = tmp_path / "anatomy.jsonl"
    argv = ["--adapter", str(tmp_path / "adapter"), "--out", str(out), "--model", tiny_dir, "--eval-limit", "4",
            "--ranges", "0-0", "1-1", "--tag", "t", "--sentence"]
    assert forgetting_anatomy.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["layers"], r["positions"]) for r in lines] == [
        ("none", "all"), ("all", "all"), ("all", "prompt"), ("all", "answer"), ("0-0", "all"), ("1-1", "all"),
        ("all", "sentence-prefix")]
    assert all(0 <= r[k] <= 100 for r in lines[:-1] for k in ("trained", "held_out", "kept"))
    assert forgetting_anatomy.main(argv) == 0 and len(out.read_text().splitlines()) == 7  # resumed: nothing new
