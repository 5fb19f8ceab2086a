"""General-prompt agreement (`meft.agreement`): the base model agrees with itself exactly (in any batch
composition), a changed model agrees less, and the trade-off probe carries the reference from the base model
to the fine-tuned one. Tiny local model and tokenizer (the mechanics; the prompts are chosen for the default
model)."""

import torch

from meft.agreement import general_agreement, general_reference
from meft.data.builtin import world_facts
from meft.data.general_prompts import GENERAL_PROMPTS
from meft.data.retention import FREE_PROMPTS
from meft.pretrained import load_model
from meft.trade_off import trade_off_probe, trade_off_summary


def test_general_prompts_are_many_distinct_and_disjoint_from_facts_and_free_prompts():
    assert len(GENERAL_PROMPTS) >= 40 and len(set(GENERAL_PROMPTS)) == len(GENERAL_PROMPTS)
    assert not set(GENERAL_PROMPTS) & set(FREE_PROMPTS)
    countries = {r["subject"] for r in world_facts().train}
    assert not [p for p in GENERAL_PROMPTS for c in countries if c in p]


def test_agreement_is_one_for_the_base_and_drops_when_the_model_changes(tiny):
    model, tok = load_model(str(tiny / "model"))
    ref = general_reference(model, tok, prompts=GENERAL_PROMPTS[:6], max_new_tokens=6, batch_size=4)
    assert len(ref["sequences"]) == len(ref["reference"]) > 0
    assert all(len(r) == len(s) - p for r, s, p in zip(ref["reference"], ref["sequences"], ref["n_prompt"]))
    same = general_agreement(model, ref, batch_size=3)  # another batch composition: the same choices
    assert same["agreement"] == 1.0 and same["n_tokens"] == sum(len(r) for r in ref["reference"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert general_agreement(model, ref)["agreement"] < 1.0


def test_probe_passes_the_reference_from_base_to_tuned(tiny):
    model, tok = load_model(str(tiny / "model"))
    base = trade_off_probe(model, tok, retention=False, generations=False, general=True)
    tuned = trade_off_probe(model, tok, retention=False, generations=False, general=True,
                            reference=base["general"]["reference"])
    summary = trade_off_summary(base, tuned)["general"]
    assert summary["agreement"] == 1.0 and summary["n_prompts"] == len(summary["per_prompt"]) > 0
    assert {"prompt", "agreement"} <= set(summary["per_prompt"][0])
