"""meft.evaluate: normalisation, batched left-padded generation vs one-at-a-time, QA accuracy after
memorising a few facts (exercises completion-only labels end to end), perplexity vs HF's own loss."""

import math

import pytest
import torch

from meft.data.records import BatchIterator, build_examples, prompt_ids
from meft.evaluate import (
    contains_match,
    exact_match,
    generate_answers,
    normalize_answer,
    perplexity,
    qa_accuracy,
)
from tests.meft.data.test_records import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("raw, norm", [
    ("  The Capital is PARIS. ", "capital is paris"), ("Bogotá", "bogota"), ("+33", "33"), (".fr", "fr"),
    ("Andorra-la-Vella", "andorra la vella"), ("An apple, a day", "apple day"), ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_and_contains():
    assert exact_match("paris.", ["Paris"]) and not exact_match("Paris, France", ["Paris"])
    assert contains_match("The capital of France is Paris.", ["Paris"])
    assert contains_match("It is +33", ["+33"]) and not contains_match("+331", ["+33"])
    assert not contains_match("dial +12", ["+1"]) and contains_match("dial +1 then", ["+1"])
    assert exact_match("Lima", ["Paris", "lima"]) and not contains_match("anything", [""])


def test_batched_generation_equals_one_at_a_time(tok):
    model = tiny_model(len(tok), seed=1)
    questions = ["What is the capital of France?", "Lima", "Where was Kalo Mira born? The fox", "EUR 12"]
    recs = [{"prompt": q, "completion": "x"} for q in questions]
    prompts = [prompt_ids(r, tok) for r in recs]
    assert len({len(p) for p in prompts}) == 4  # different lengths: left padding matters
    alone = [generate_answers(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    together = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=6)
    assert together == alone
    assert len(set(alone)) == 4 and all(alone)  # prompt-dependent text: the comparison is not vacuous


def test_qa_accuracy_scores_model_predictions(tok):
    model = tiny_model(len(tok), seed=2)
    recs = [{"prompt": p, "completion": "unused"} for p in ["What is the capital of France?", "Lima", "EUR"]]
    preds = generate_answers(model, tok, [prompt_ids(r, tok) for r in recs], max_new_tokens=5)
    right = [{**r, "answers": [p]} for r, p in zip(recs, preds)]
    res = qa_accuracy(model, tok, right, batch_size=2, max_new_tokens=5, progress=True)
    assert res["exact_match"] == 1.0 and res["contains"] == 1.0 and res["n"] == 3
    assert [i["prediction"] for i in res["items"]] == preds
    wrong = [{**r, "answers": ["zzz-not-it"]} for r in recs]
    assert qa_accuracy(model, tok, wrong, max_new_tokens=5)["exact_match"] == 0.0
    assert model.training is False
    with pytest.raises(ValueError, match="no records"):
        qa_accuracy(model, tok, [])


def test_memorised_facts_are_answered_exactly(tok):
    """Train a tiny model on 4 facts with completion-only labels; greedy answers must be exact
    (including stopping at <|im_end|>, which the labels teach)."""
    recs = [{"prompt": "What is the capital of France?", "completion": "Paris"},
            {"prompt": "Which city is the capital of Peru?", "completion": "Lima"},
            {"prompt": "Where was Kalo Mira born?", "completion": "Venton"},
            {"prompt": "What is the currency of France?", "completion": "EUR"}]
    model = tiny_model(len(tok), seed=3).train()
    before = qa_accuracy(model, tok, recs, max_new_tokens=8)["exact_match"]
    batches = BatchIterator(build_examples(recs, tok), batch_size=4, pad_token_id=tok.pad_token_id, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(**next(batches)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = qa_accuracy(model, tok, recs, batch_size=3, max_new_tokens=8)
    assert before < 1.0 and loss.item() < 0.05
    assert res["exact_match"] == 1.0, res["items"]


def test_perplexity_matches_hf_loss(tok):
    model = tiny_model(len(tok), seed=4)
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris", "What is the capital of Peru? Lima"]
    res = perplexity(model, tok, texts, batch_size=2, progress=True)
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert res["n_tokens"] == count
    torch.testing.assert_close(res["loss"], nll / count, rtol=1e-5, atol=1e-5)
    assert math.isclose(res["perplexity"], math.exp(nll / count), rel_tol=1e-5)
    one = perplexity(model, tok, texts, batch_size=1)
    torch.testing.assert_close(one["loss"], res["loss"], rtol=1e-5, atol=1e-5)
    windowed = perplexity(model, tok, texts, max_length=4)
    assert windowed["n_tokens"] < count  # no context crosses a window: fewer predicted tokens


def test_common_prefix_length():
    from meft.evaluate import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2 and common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([]) == 0


def _wrapped_tiny(tok, seed):
    """A tiny model wrapped with an adapter whose values are nonzero, so the adapter changes its answers."""
    import meft
    from meft.config import MeftConfig

    model = tiny_model(len(tok), seed=seed)
    meft.wrap(model, MeftConfig(adapter_rows=256, expert_size=16, max_active_rows=64, wire_dtype="float32"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for store in model.meft.stores:
            w = store.weights.clone()
            w[:, w.shape[1] // 2:] = torch.randn(w.shape[0], w.shape[1] // 2, generator=g)
            store.set_weights(w)
    model.meft.stores_changed()
    return model.eval()


@pytest.mark.parametrize("wrapped", [False, True])
def test_shared_prefix_fast_path_equals_plain_twin(tok, wrapped, monkeypatch):
    """The fast path (common chat prefix computed once, its KV cache copied into every batch, suffixes
    left-padded behind it) gives the plain twin's answers, for every batch size; it really runs."""
    import meft.evaluate as ev

    model = _wrapped_tiny(tok, 3) if wrapped else tiny_model(len(tok), seed=3)
    questions = ["What is the capital of France?", "Lima", "Where was Kalo Mira born? The fox", "EUR 12",
                 "Which city is the capital of Peru?", "The quick brown fox", "+33 .fr", "named SmolLM"]
    prompts = [prompt_ids({"prompt": q, "completion": "x"}, tok) for q in questions]
    assert ev.common_prefix_length(prompts) >= ev._MIN_SHARED_PREFIX  # the chat template's system message
    calls = []
    real = ev._prefix_cache
    monkeypatch.setattr(ev, "_prefix_cache", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        plain = generate_answers(model, tok, prompts, batch_size=8, max_new_tokens=8, share_prefix=False)
        assert not calls
        for bs in (1, 3, 8):
            assert generate_answers(model, tok, prompts, batch_size=bs, max_new_tokens=8) == plain, bs
    assert len(calls) == 3
    assert len(set(plain)) > 4 and all(plain)  # prompt-dependent answers: the comparison is not vacuous
    if wrapped:  # the adapter changed the answers: the fast path ran through it
        assert plain != generate_answers(tiny_model(len(tok), seed=3), tok, prompts, batch_size=8,
                                         max_new_tokens=8, share_prefix=False)
        model.meft.close()


def test_trade_off_probe_and_summary(tok):
    from meft.data.retention import FREE_PROMPTS, RETENTION_QUESTIONS
    from meft.trade_off import trade_off_probe, trade_off_summary

    base_model, tuned_model = tiny_model(len(tok), seed=4), _wrapped_tiny(tok, 4)
    base, tuned = trade_off_probe(base_model, tok), trade_off_probe(tuned_model, tok)
    tuned_model.meft.close()
    assert base["retention"]["n"] == len(RETENTION_QUESTIONS) == 30
    assert [g["prompt"] for g in base["generations"]] == list(FREE_PROMPTS)
    s = trade_off_summary(base, tuned)
    assert s["retention"]["before"] == base["retention"]["contains"]
    assert s["retention"]["after"] == tuned["retention"]["contains"]
    items = s["retention"]["items"]
    assert len(items) == 30 and {"prompt", "answers", "before", "after"} <= set(items[0])
    assert [(g["base"], g["tuned"]) for g in s["generations"]] == [
        (b["answer"], t["answer"]) for b, t in zip(base["generations"], tuned["generations"])]
    # kept: of the facts answered before, the share answered after (fabricated probes: 2 known, 1 kept)
    item = {"prompt": "q", "answers": ["a"], "prediction": "a", "contains": True}
    fake_b = {"retention": {"exact_match": 1.0, "contains": 2 / 3, "n": 3,
                            "items": [item, {**item, "prompt": "r"}, {**item, "prompt": "s", "contains": False}]}}
    fake_a = {"retention": {"exact_match": 0.0, "contains": 1 / 3, "n": 3,
                            "items": [item, {**item, "prompt": "r", "contains": False}, {**item, "prompt": "s"}]}}
    r = trade_off_summary(fake_b, fake_a)["retention"]
    assert r["kept"] == 0.5 and r["lost"] == ["r"]
