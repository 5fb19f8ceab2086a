"""The locality term's background questions (`meft.data.locality`) in a training micro-batch: which questions,
their layout, their weight (packed equals padded), and that they carry no language-model loss."""

import pytest
import torch

import meft
from meft.data.locality import BackgroundQuestions, padded_background_weight, with_background
from meft.data.packed import pack_batch
from meft.data.records import IGNORE_INDEX
from meft.data.replay import outside_questions
from meft.data.retention import retention_records
from meft.train.loop import lay_out
from meft.train.loss import causal_lm_loss
from tests.meft.adapter.test_wrap import small_config, tiny_model, train
from tests.meft.data.test_packed import PREFIX, _qa_batch

BACKGROUND = [PREFIX + [20, 21, 22, 23], PREFIX + [30, 31, 32], PREFIX + [40, 41, 42, 43, 44, 45]]


class _Tok:
    """Just enough of a tokenizer for `prompt_ids` without a chat template: one id per character."""
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def test_questions_leave_out_the_training_subjects_and_the_probe_and_draw_reproducibly():
    exclude = {q["subject"] for q in outside_questions()[:30]}
    bg = BackgroundQuestions(_Tok(), per_batch=4, exclude=exclude, seed=7)
    assert not bg.subjects & exclude
    assert not bg.subjects & {r["subject"] for r in retention_records()}
    assert len(bg.rows) == len(outside_questions(exclude))
    a, b = bg.sample(5, 1, 0), bg.sample(5, 1, 0)
    assert a == b and len(a) == 4 and len({tuple(r) for r in a}) == 4  # the same draw for the same position
    assert bg.sample(5, 1, 1) != a and bg.sample(6, 1, 0) != a  # another rank / step: another draw
    with pytest.raises(ValueError, match="locality_background=0: a positive int"):
        BackgroundQuestions(_Tok(), per_batch=0)
    with pytest.raises(ValueError, match=r"only \d+ built-in questions .* --locality-background"):
        BackgroundQuestions(_Tok(), per_batch=10**6)


def test_background_rows_are_appended_without_labels():
    batch = _qa_batch()
    out = with_background(batch, BACKGROUND, pad_id=0)
    B, T = batch["input_ids"].shape
    assert out["input_ids"].shape == (B + 3, T) and out["background"].tolist() == [False] * B + [True] * 3
    assert (out["labels"][B:] == IGNORE_INDEX).all()
    torch.testing.assert_close(out["labels"][:B], batch["labels"])
    assert out["attention_mask"][B:].sum(1).tolist() == [len(r) for r in BACKGROUND]
    w = padded_background_weight(out["attention_mask"], out["background"])  # [B + 3, T]
    assert w[:B].sum() == 0 and abs(float(w.sum()) - 1) < 1e-6


def _model():
    model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=256, locality_weight=0.1))  # no budget
    train(model, _qa_batch()["input_ids"], 2)  # values off zero
    return model


def test_background_tokens_get_no_language_model_loss():
    """With the budget not binding a token's output does not depend on its batch: adding background rows leaves
    the LM loss as it was, padded and packed."""
    model = _model()
    plain = _qa_batch()
    with_bg = with_background(plain, BACKGROUND, pad_id=0)
    def loss(laid):  # a training forward, then the step closes (nothing was learned: no backward)
        out = causal_lm_loss(model, laid).detach()
        model.meft.optimizer.step()
        return out

    for pack in (False, True):
        want = loss(lay_out(model, plain, pack))
        laid = lay_out(model, with_bg, pack)
        assert "background" not in laid and "background_weight" in laid
        laid.pop("background_weight")
        torch.testing.assert_close(loss(laid), want, rtol=1e-5, atol=1e-6)
    model.meft.close()


def test_packed_term_equals_the_padded_term():
    """The shared prompt prefix is computed once in the packed layout; its weight stands for every background row
    that holds it, so the locality term is the padded layout's mean over background tokens."""
    model = _model()
    batch = with_background(_qa_batch(), BACKGROUND, pad_id=0)
    packed = pack_batch(batch)
    assert packed["input_ids"].shape[1] < batch["attention_mask"].sum()  # the prefix really is shared
    terms = []
    for laid in (lay_out(model, batch, False), packed):
        model.meft.locality.set_weight(laid.pop("background_weight"))
        model(**laid)
        terms.append(model.meft.locality.term().detach())
        model.meft.optimizer.step()
    assert float(terms[0]) > 0
    torch.testing.assert_close(terms[1], terms[0], rtol=1e-5, atol=1e-8)
    model.meft.close()
