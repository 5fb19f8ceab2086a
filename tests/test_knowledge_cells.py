"""The knowledge harness's training step and cell checkpoints on a tiny local Llama: every method's packed
step gives the padded step's loss and update, and a cell stopped mid-training (in this process, and as the
CLI's subprocess cells) resumes from its checkpoint to the uninterrupted run's losses and scores, exactly."""

import dataclasses
import json

import pytest
import torch

from experiments.knowledge import cli as knowledge
from experiments.knowledge.cell_state import CellCheckpoint, load_cell, save_cell
from experiments.knowledge.cells import cell_folder
from experiments.knowledge.methods import METHODS, build_trainer
from experiments.knowledge.runner import CellStopped, RunSpec, _batches, _computed, load_facts, run_one, spec_key
from meft import load_model

SMALL = dict(n_facts=5, steps=5, batch_size=4, rows=64, max_active_rows=32, expert_size=16, eval_limit=4,
             max_new_tokens=4)
TWINS = ("meft", "lora8", "dense", "full_adalomo")  # one of each kind of trainer
# every kind of trained state: MEFT's runtime (meft_sparse: the same), with an AdaLomo backbone, peft LoRA
# (lora16 / lora64: the same), the dense adapter, the whole model under AdaLomo
RESUMED = ("meft", "meft_adalomo", "lora8", "dense", "full_adalomo")
assert set(TWINS) <= set(RESUMED) <= set(METHODS)


@pytest.fixture(scope="module")
def tiny_dir(tiny):
    return str(tiny / "model")  # the tiny local HF folder of tests/conftest.py


def _trainer(tiny_dir, method: str, pack: bool):
    model, _ = load_model(tiny_dir, dtype=torch.float32)
    return build_trainer(method, model, rows=64, max_active_rows=32, expert_size=16, lr=1e-2, pack=pack)


@pytest.mark.parametrize("method", TWINS)
def test_packed_step_gives_the_padded_steps_loss_and_update(tiny_dir, method):
    """Two steps of the same batches, packed and padded (chat template: a shared prefix packs once); same
    losses (to fp32 rounding) and the same trained weights after them."""
    spec = RunSpec(method=method, model=tiny_dir, chat=True, **SMALL)
    _, tok = load_model(tiny_dir)
    stream = _batches(load_facts(spec), tok, spec)
    batches = [next(stream), next(stream)]
    packed, padded = _trainer(tiny_dir, method, True), _trainer(tiny_dir, method, False)
    for batch in batches:
        lp, np_ = packed.step(batch)
        lq, nq = padded.step(batch)
        assert np_ == nq > 0
        assert lp == pytest.approx(lq, rel=1e-5, abs=1e-6), (method, lp, lq)
    # weights within 1% of one lr-1e-2 step: Adam's normalised update turns a rounding-level gradient difference
    # on a near-zero gradient (LoRA's A, whose B was 0 a step before) into up to ~0.3% of a step
    for (name, p), q in zip(packed.model.named_parameters(), padded.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
    if method == "meft":
        for s, t in zip(packed.rt.stores, padded.rt.stores):
            torch.testing.assert_close(s.weights, t.weights, rtol=1e-4, atol=1e-5)
    # the packed step really packed: fewer positions than the padded [B, T] batch
    assert _computed(packed, batches[0]) < _computed(padded, batches[0]) == batches[0]["input_ids"].numel()
    packed.close()
    padded.close()


@pytest.mark.parametrize("method", RESUMED)
def test_a_stopped_cell_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path, method):
    spec = RunSpec(method=method, model=tiny_dir, **SMALL)
    whole = run_one(spec)
    ck = CellCheckpoint(str(tmp_path / "cell"), save_every=2, stop_after=3)
    with pytest.raises(CellStopped, match="after step 3 of 5"):
        run_one(spec, ck)
    resumed = run_one(spec, dataclasses.replace(ck, resume=True, stop_after=0))
    assert resumed["resumed_from_step"] == 3 and whole["resumed_from_step"] == 0
    assert resumed["losses"] == whole["losses"]  # bitwise: every step reads the same state
    assert len(resumed["losses"]) == 5 and resumed["labelled_tokens"] == whole["labelled_tokens"]
    for split in ("trained", "held_out"):
        assert resumed["eval"][split] == whole["eval"][split]
    again = run_one(spec, dataclasses.replace(ck, stop_after=0))  # without resume: the old checkpoint is dropped
    assert again["resumed_from_step"] == 0 and again["losses"] == whole["losses"]


def test_a_checkpoint_of_another_run_is_refused(tiny_dir, tmp_path):
    spec = RunSpec(method="lora8", model=tiny_dir, **SMALL)
    model, tok = load_model(tiny_dir)
    tr = build_trainer("lora8", model, lr=1e-2)
    ck = CellCheckpoint(str(tmp_path / "cell"), save_every=1, resume=True)
    batches = _batches(load_facts(spec), tok, spec)
    save_cell(ck, tr, batches, dataclasses.asdict(spec), {"step": 1})
    other = dataclasses.asdict(dataclasses.replace(spec, lr=3e-3))
    with pytest.raises(ValueError, match="written by another run"):
        load_cell(ck, tr, batches, other)
    with pytest.raises(ValueError, match="save_every"):
        CellCheckpoint(str(tmp_path), save_every=-1)


def test_runs_before_packing_keep_their_identity():
    """A stored spec without `packing` ran the padded step: it is not a packed run's result; the base model
    (no step) is the same cell either way."""
    old = {"method": "meft", "n_facts": 5}
    assert spec_key(old) == spec_key({**old, "packing": "off"}) != spec_key({**old, "packing": "auto"})
    assert spec_key({"method": "base"}) == spec_key({"method": "base", "packing": "auto"})
    assert RunSpec(method="meft").packing == "auto"
    assert knowledge.parse_args(["--packing", "off"]).packing == "off"
    with pytest.raises(SystemExit):
        knowledge.parse_args(["--save-every", "-1"])


def test_cli_cells_stop_and_resume_mid_cell(tiny_dir, tmp_path):
    """The CLI's own subprocess cells: stopped after step 2 (test hook), the results file holds the stops; with
    --resume each continues from its checkpoint to the uninterrupted run's losses and scores; the
    checkpoint folders are removed once the results are in."""
    argv = ["--methods", "meft", "lora8", "--datasets", "fictional", "--seeds", "0", "--n-fictional", "5",
            "--steps", "4", "--batch-size", "4", "--rows", "64", "--max-active-rows", "32", "--expert-size", "16",
            "--eval-limit", "4", "--model", tiny_dir, "--save-every", "3"]
    ref, out = tmp_path / "ref.jsonl", tmp_path / "cells.jsonl"
    assert knowledge.main(argv + ["--out", str(ref)]) == 0
    assert knowledge.main(argv + ["--out", str(out), "--stop-after-steps", "2"]) == 0
    stopped = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert sorted(r["error"].split(":")[0] for r in stopped if "error" in r) == ["stopped", "stopped"]
    cells = out.with_suffix(".cells")
    assert len(list(cells.iterdir())) == 2
    assert knowledge.main(argv + ["--out", str(out), "--resume"]) == 0
    want = {r["spec"]["method"]: r for r in map(json.loads, ref.read_text().splitlines())}
    got = {r["spec"]["method"]: r for r in map(json.loads, out.read_text().splitlines()) if "error" not in r}
    assert set(got) == set(want) == {"base", "meft", "lora8"}
    for m in ("meft", "lora8"):
        assert got[m]["resumed_from_step"] == 2 and want[m]["resumed_from_step"] == 0
        assert got[m]["losses"] == want[m]["losses"] and got[m]["eval"] == want[m]["eval"], m
        assert got[m]["packed"] is True
        assert not cell_folder(cells, RunSpec(**got[m]["spec"])).exists()
    assert not cells.exists()  # every result is in: no checkpoint is left


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the report plots a run-less curve
def test_capacity_report_names_runs_from_before_packing(tmp_path, capsys):
    out = tmp_path / "old.jsonl"
    old = {"method": "meft", "dataset": "fictional", "n_facts": 5, "seed": 0, "steps": 2, "lr": 1e-2}
    out.write_text(json.dumps({"spec": old, "error": "a stored run"}) + "\n")
    assert knowledge.main(["--capacity", "--report", "--ns", "5", "--methods", "meft", "--out", str(out)]) == 0
    assert "1 run(s) in" in capsys.readouterr().out
    assert knowledge.main(["--capacity", "--report", "--ns", "5", "--methods", "meft", "--packing", "off",
                           "--out", str(out)]) == 0
    assert "run(s) in" not in capsys.readouterr().out
