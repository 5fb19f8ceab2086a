"""MeftConfig.sparse_update (sparse memory finetuning) through a wrapped model: validation,
the background idf, only the top-t experts' rows updated (the others bit for bit unchanged, moments and
step counts included), offloaded == resident, and a mask that keeps every active row == sparse_update=0."""

import pytest
import torch

import meft
from meft.config import MeftConfig
from tests.meft.adapter.test_wrap import VOCAB, batch, small_config, tiny_model, train


def _store_state(rt):
    rt.sync_to_host()
    return [[t.clone() for t in (s.weights, s.exp_avg, s.exp_avg_sq, s.steps)] for s in rt.stores]


def _wrap(t: int, **kw):
    """Tiny llama, small_config (32 experts of 8 rows, 2 per token, budget 8 experts), background = 96
    random tokens (the tiny model has no tokenizer)."""
    model = meft.wrap(tiny_model("llama"), small_config(sparse_update=t, **kw))
    if t:
        bg = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(5))
        model.meft.capture_background(model, [bg[:1], bg[1:]])
    return model


def test_config_validation():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="sparse_update"):
            MeftConfig(sparse_update=bad).validate()
    with pytest.raises(ValueError, match=r"sparse_update = 64: fewer than the row budget in experts \(64"):
        MeftConfig(adapter_rows=4096, expert_size=16, max_active_rows=1024, sparse_update=64).validate()
    with pytest.raises(ValueError, match="sparse_background_tokens"):
        MeftConfig(sparse_background_tokens=0).validate()
    assert MeftConfig(sparse_update=8).validate().to_dict()["sparse_update"] == 8
    assert MeftConfig().sparse_update == 0


def test_background_is_captured_per_layer_and_idf_follows_usage():
    model = _wrap(3)
    rt = model.meft
    assert sorted(rt.sparse.background) == [0, 1] and rt.sparse.background[0].shape == (96, 32)
    idf = rt.sparse.idf(rt.adapters[0], rt._step)  # [E]
    bg = rt._route(rt.adapters[0], rt.sparse.background[0], None, budget=False).load
    assert bg.sum() == 96 * 2  # every background token routes to its 2 experts, no budget
    torch.testing.assert_close(idf, torch.log(torch.tensor(97.0) / (bg + 1)))
    rt.close()


def test_only_top_experts_update_the_rest_bitwise_unchanged():
    t = 2
    model = _wrap(t)
    rt, ids = model.meft, batch(4, 10)
    train(model, ids, 2)  # warm: moments of the rows touched so far are non-zero
    before = _store_state(rt)
    train(model, ids, 1)
    after = _store_state(rt)
    assert rt.routing_stats()["updated_rows"] == t * 8
    for (w0, m0, v0, s0), (w1, m1, v1, s1) in zip(before, after):
        stepped = s1 != s0  # [N]
        assert int(stepped.sum()) == t * 8  # t experts of 8 rows: a budget of 8 experts routed, t updated
        assert torch.equal(s1[stepped], s0[stepped] + 1)
        for a, b in ((w0, w1), (m0, m1), (v0, v1)):
            assert torch.equal(a[~stepped], b[~stepped])  # no zero-gradient AdamW step: untouched bit for bit
        assert not torch.equal(m0[stepped], m1[stepped])
    rt.close()


def test_no_background_is_a_clear_error():
    model = meft.wrap(tiny_model("llama"), small_config(sparse_update=2))  # no tokenizer: nothing captured
    with pytest.raises(RuntimeError, match="capture_background"):
        train(model, batch(2, 6), 1)


@pytest.mark.parametrize("accum,prefetch", [(1, "none"), (2, "none"), (1, "lookahead")])
def test_offloaded_equals_resident(accum, prefetch):
    """The mask travels with the row gradients through TransferScheduler (fused update, step union, a
    lookahead's compacted partial push) exactly as through the resident twin."""
    ids = batch(4, 10)
    runs = []
    for offload in (True, False):
        model = _wrap(2, offload=offload, grad_accum_steps=accum, prefetch=prefetch)
        losses = train(model, ids, 4, accum=accum)
        runs.append((losses, _store_state(model.meft)))
        model.meft.close()
    (l_off, s_off), (l_res, s_res) = runs
    torch.testing.assert_close(torch.tensor(l_off), torch.tensor(l_res), rtol=1e-5, atol=1e-6)
    for la, lb in zip(s_off, s_res):
        for a, b in zip(la, lb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mask_keeping_every_active_row_is_bitwise_sparse_update_0():
    """One short sequence routes to at most 3 tokens x 2 experts = 6 experts, so sparse_update=7 keeps every
    active row: training must be bitwise that of sparse_update=0 (which pushes no mask at all)."""
    ids = batch(1, 3)
    runs = []
    for t in (0, 7):
        model = _wrap(t)
        losses = train(model, ids, 3)
        gates = [ad.gate.detach().clone() for ad in model.meft.adapters]
        runs.append((losses, _store_state(model.meft), gates, model.meft.routing_stats()))
        model.meft.close()
    (l0, s0, g0, r0), (l7, s7, g7, r7) = runs
    assert l0 == l7
    for la, lb in zip(s0, s7):
        for a, b in zip(la, lb):
            assert torch.equal(a, b)
    for a, b in zip(g0, g7):
        assert torch.equal(a, b)
    assert "updated_rows" not in r0 and r7["updated_rows"] > 0


def test_question_background_is_captured_at_wrap():
    """sparse_background='questions': wrap captures the FFN inputs of exactly the built-in questions' rows."""
    from meft.data.background import background_token_ids
    from tests.meft.data.test_records import tiny_model as tiny_lm
    from tests.meft.data.test_records import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = small_config(sparse_update=2, sparse_background="questions", sparse_background_tokens=80)
    model = meft.wrap(tiny_lm(len(tok)), cfg, tokenizer=tok)
    got = {i: x.clone() for i, x in model.meft.sparse.background.items()}
    assert sorted(got) == [0, 1] and got[0].shape == (80, 32)
    model.meft.capture_background(model, background_token_ids(tok, 80, source="questions"))
    for i, x in model.meft.sparse.background.items():
        torch.testing.assert_close(got[i], x, rtol=0, atol=0)
    pydoc = background_token_ids(tok, 80)
    model.meft.capture_background(model, pydoc)  # another text: other inputs
    assert not torch.equal(got[0], model.meft.sparse.background[0])
