"""meft.data.replay and `meft train --replay`: which questions are replayed (never the training data's or the
trade-off probe's countries), the base model's answers as records, and a run that trains on them."""

import json

import pytest
import torch

from meft.data.builtin import world_facts
from meft.data.records import prompt_ids, with_system_prompt
from meft.data.replay import replay_prompts
from meft.data.retention import FREE_SUBJECTS, retention_records
from meft.evaluate import generate_answers, normalize_answer
from meft.train.replay import self_replay_records
from tests.meft.cli.test_train import _cmd, _run
from tests.meft.data.test_records import tiny_model, tiny_tokenizer


def test_replay_prompts_leave_out_training_and_probe_countries():
    trained = {r["subject"] for r in world_facts(max_countries=50, seed=0).train}
    got = replay_prompts(300, trained, seed=0)
    assert len(got) == 300 and len({(r["subject"], r["relation"]) for r in got}) == 300
    subjects = {r["subject"] for r in got}
    assert not subjects & trained
    assert not subjects & {r["subject"] for r in retention_records()}
    assert not subjects & set(FREE_SUBJECTS)
    assert len({r["relation"] for r in got}) > 4  # every relation, not only the probe's four
    assert replay_prompts(300, trained, seed=0) == got and replay_prompts(300, trained, seed=1) != got
    with pytest.raises(ValueError, match="replay=-1.*fix"):
        replay_prompts(-1)
    with pytest.raises(ValueError, match="only .* questions .*fix: --replay"):
        replay_prompts(10**6)


def test_self_replay_records_are_the_models_first_sentences():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(len(tok)).train()
    prompts = replay_prompts(6, seed=0)
    recs = self_replay_records(model, tok, prompts, system_prompt="", max_new_tokens=8)
    assert model.training  # restored
    asked = with_system_prompt([{"prompt": p["prompt"], "completion": "-"} for p in prompts], "")
    answers = generate_answers(model.eval(), tok, [prompt_ids(r, tok) for r in asked], max_new_tokens=8)
    expected = [(p["prompt"], a.split(". ")[0].strip()) for p, a in zip(prompts, answers) if a.strip()]
    assert [(r["prompt"], r["completion"].rstrip(".")) for r in recs] == [(p, a.rstrip(".")) for p, a in expected]
    assert all(r["replay"] and r["subject"] and r["relation"] for r in recs)


def test_answer_form_replays_the_short_answers_the_model_gave():
    """form="answer": a question is replayed with its short answer only when the model's own answer contains it
    (a fact it knew), and dropped otherwise. The tiny model knows no fact, so each question's accepted answers are
    set here to a word of the model's own answer (kept) or to a word it did not say (dropped)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(len(tok)).eval()
    prompts = replay_prompts(6, seed=0)
    asked = with_system_prompt([{"prompt": p["prompt"], "completion": "-"} for p in prompts], "")
    answers = generate_answers(model, tok, [prompt_ids(r, tok) for r in asked], max_new_tokens=8)
    said = [next((w for w in normalize_answer(a).split() if w.isalpha() and len(w) > 1), None) for a in answers]
    assert sum(w is not None for w in said) >= 3, answers  # enough answers with a word to keep
    for i, (p, w) in enumerate(zip(prompts, said)):
        p["answers"] = ["zzzqqq", w] if w is not None and i % 2 == 0 else ["zzzqqq"]
    recs = self_replay_records(model, tok, prompts, system_prompt="", max_new_tokens=8, form="answer")
    kept = [(p["prompt"], w) for i, (p, w) in enumerate(zip(prompts, said)) if w is not None and i % 2 == 0]
    assert [(r["prompt"], r["completion"]) for r in recs] == kept and kept
    assert all(r["replay"] for r in recs)
    with pytest.raises(ValueError, match="replay form 'short'.*sentence, answer"):
        self_replay_records(model, tok, prompts, form="short")


def test_train_with_replay(tiny, tmp_path):
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--epochs", "1", "--replay", "8", "--eval-before", "false", "--eval-after", "false",
                    "--retention", "false", "--generations", "false", "--general", "false"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "replay: " in res.stdout and "+ " in res.stdout
    n = int(res.stdout.split("replay: ")[1].split()[0])
    assert 0 < n <= 8
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps == -(-(24 + n) // 4)  # one epoch over the 24 training records and the replayed ones, batch 4


def test_bad_replay_form_is_refused_before_the_model_loads(tiny, tmp_path):
    res = _run(_cmd(tiny, tmp_path / "run", "--replay", "4", "--replay-form", "short"))
    assert res.returncode != 0
    assert "--replay-form 'short': choose one of sentence, answer" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
