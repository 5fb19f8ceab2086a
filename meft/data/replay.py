"""Self-replay against forgetting: the model's own answers, before training, to questions outside the run.

Owns what `meft train --replay N` mixes into the training data:

* `replay_prompts(n, exclude, seed)`: N world-fact questions (`meft.data.builtin.world_facts`, every
  relation, first training phrasing) about countries that are in neither the run's training data
  (`exclude`: the subjects of its records), the trade-off probe's retention set nor its free prompts
  (`meft.data.retention`), in seeded order. The probe therefore still scores facts that no training
  example, replayed or taught, ever asked about.
* `self_replay_records(model, tokenizer, prompts, ..., form=)`: the untrained model's greedy answers to them
  as prompt/completion records (a record marked ``"replay": True``), in one of two forms (`REPLAY_FORMS`):
  ``"sentence"``, the answer cut to its first sentence ("The capital of Peru is Lima."), or ``"answer"``,
  the fact's short answer ("Lima") where the model's own answer contains it, the question dropped where it
  does not. The short form is for training data whose answers are short (the built-in sets): sentence
  replay there teaches two answer formats at once -- a short answer for the taught countries, a sentence
  for the others. Measured on the quick start (experiments/results/quickstart_lr_seeds.jsonl), sentence replay
  cost held-out exact match, and the short form kept too few records to matter: the default model knew 20 of
  150 replayed facts.

Training on them is rehearsal with self-generated targets (in the spirit of Self-Synthesized Rehearsal,
arXiv 2403.01244): the adapter is taught to leave the model's answers alone where it was taught nothing,
not to answer better (a wrong base answer is replayed as it is). Nothing is downloaded and nothing about
the probe's questions enters training. The short form replays only what the model already knew: a fact the
model got wrong is left out, never taught.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

import torch

from meft.data.builtin import WORLD_RELATIONS, world_facts
from meft.data.records import prompt_ids, with_system_prompt
from meft.data.retention import FREE_SUBJECTS, retention_records
from meft.evaluate import contains_match, generate_answers

__all__ = ["outside_questions", "replay_prompts", "self_replay_records", "REPLAY_MAX_NEW_TOKENS", "REPLAY_FORMS"]

REPLAY_MAX_NEW_TOKENS = 24  # one sentence of the base model ("The capital of X is Y." ~ 9 tokens)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
REPLAY_FORMS = ("sentence", "answer")


def outside_questions(exclude: Iterable[str] = ()) -> list[dict]:
    """Every world-fact question (first training phrasing of each fact, every relation) about a country in
    neither `exclude`, the trade-off probe's retention set nor its free prompts, as QA records (prompt, answers,
    subject, relation) sorted by (subject, relation): the pool replay draws from (and the sparse update's
    question background, `meft.data.background`)."""
    banned = set(exclude) | {r["subject"] for r in retention_records()} | set(FREE_SUBJECTS)
    pool: dict[tuple[str, str], dict] = {}
    for relation in WORLD_RELATIONS:
        for rec in world_facts((relation,), seed=0).train:  # 3 train phrasings per fact, in order: keep the first
            if rec["subject"] not in banned:
                pool.setdefault((rec["subject"], relation), {"prompt": rec["prompt"], "answers": rec["answers"],
                                                            "subject": rec["subject"], "relation": relation})
    return sorted(pool.values(), key=lambda r: (r["subject"], r["relation"]))


def replay_prompts(n: int, exclude: Iterable[str] = (), *, seed: int = 0) -> list[dict]:
    """`n` QA records (prompt, answers, subject, relation) for replay, drawn from `outside_questions(exclude)` in
    seeded order."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"replay={n!r}: must be an int >= 0 (questions replayed); fix: e.g. --replay 150")
    out = outside_questions(exclude)
    random.Random(seed).shuffle(out)
    if n > len(out):
        raise ValueError(f"replay={n}: only {len(out)} world-fact questions are outside the training data and "
                         f"the retention probe; fix: --replay {len(out)} or fewer")
    return out[:n]


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()


def self_replay_records(model, tokenizer, prompts: Sequence[dict], *, system_prompt: str | None = None,
                        batch_size: int = 32, max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
                        chat: bool | None = None, form: str = "sentence") -> list[dict]:
    """The model's greedy answers to `prompts` as prompt/completion records (asked as the run asks:
    `system_prompt`, and `chat` as in `prompt_ids`). `form` "sentence": the first sentence of each answer
    (empty ones dropped); "answer": the first of the prompt's ``answers`` that the model's answer contains
    (`contains_match`), the prompt dropped when it contains none."""
    if form not in REPLAY_FORMS:
        raise ValueError(f"replay form {form!r}: choose one of {', '.join(REPLAY_FORMS)}")
    asked = with_system_prompt([{"prompt": p["prompt"], "completion": "-"} for p in prompts], system_prompt)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, [prompt_ids(r, tokenizer, chat) for r in asked],
                                       batch_size=batch_size, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    out = []
    for p, a in zip(prompts, answers):
        if form == "sentence":
            completion = _first_sentence(a)
        else:
            completion = next((ans for ans in p["answers"] if contains_match(a, [ans])), "")
        if completion:
            out.append({"prompt": p["prompt"], "completion": completion, "subject": p["subject"],
                        "relation": p["relation"], "replay": True})
    return out
