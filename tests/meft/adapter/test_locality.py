"""The locality term (`meft.adapter.locality`, `model.meft.locality`): its value and gradients against a plain
reference from the adapters' own outputs, exact accumulation, zero-copy equal to staged, no sync, clear errors."""

import pytest
import torch

import meft
from meft.adapter.locality import LocalityTerm
from meft.config import MeftConfig
from meft.profile.syncs import SyncCounter
from tests.meft.adapter.test_pipeline import _ours
from tests.meft.adapter.test_wrap import adapter_state, batch, small_config, tiny_model, train

ALL_ROWS = dict(max_active_rows=256)  # budget not binding: a token's output does not depend on its batch
LAM = 0.5


def _trained(steps: int = 3, **kw):
    """A wrapped tiny llama whose adapter values moved off zero (a zero adapter has a zero term)."""
    model = meft.wrap(tiny_model("llama"), small_config(**kw))
    train(model, batch(4, 10, seed=3), steps)
    return model


def _tap(model) -> list[torch.Tensor]:
    """Every adapter output delta h [T, d] of the next forwards (training ones), in call order."""
    outs = []
    for ad in model.meft.adapters:
        real = ad._delta

        def delta(x, *a, real=real):
            y = real(x, *a)
            if torch.is_grad_enabled():
                outs.append(y.reshape(-1, y.shape[-1]))
            return y

        ad._delta = delta
    return outs


def _weight(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(ids.numel(), generator=g) * (torch.rand(ids.numel(), generator=g) > 0.4)  # [T], some zeros


def _reference(outs: list[torch.Tensor], w: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over layers of sum_t w_t relu(||dh_t|| - margin)^2, with the norm itself (no trick)."""
    terms = [(w * torch.relu(torch.linalg.vector_norm(y.float(), dim=-1) - margin).pow(2)).sum() for y in outs]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("token_rows", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.02])
def test_term_and_gradients_equal_the_reference_from_the_adapter_outputs(token_rows, margin):
    """The runtime's term equals the plain formula over the hooked adapter outputs (CPU per-token rows and the
    dense twin), and backpropagating it gives the reference's row and gate gradients."""
    ids = batch(3, 9, seed=4)
    w = _weight(ids)
    grads = []
    for use_runtime in (True, False):
        model = _trained(offload=False, locality_margin=margin)
        model.meft.token_rows = token_rows
        outs = _tap(model)
        model.meft.locality.set_weight(w)
        model(input_ids=ids)
        ref = _reference(outs, w, margin)
        term = model.meft.locality.term()
        assert len(outs) == len(model.meft.adapters) and float(ref.detach()) > 0
        torch.testing.assert_close(term, ref, rtol=1e-5, atol=1e-7)
        (term if use_runtime else ref).backward()
        grads.append([lay.grad.clone() for lay in model.meft.scheduler.layers]
                     + [ad.gate.grad.clone() for ad in model.meft.adapters])
        if margin:  # some tokens are under the margin, some above: the margin matters
            norms = torch.cat([torch.linalg.vector_norm(y, dim=-1) for y in outs])
            assert (norms < margin).any() and (norms > margin).any()
        model.meft.close()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_no_weight_no_term_and_eval_forwards_add_nothing():
    model = _trained()
    ids = batch(2, 8)

    def step():  # one training forward, one optimizer step
        model(input_ids=ids)
        model.meft.optimizer.step()

    step()
    assert model.meft.locality.term() is None  # no weight set: nothing, and the next forward takes none
    model.meft.locality.set_weight(torch.ones(ids.numel()))
    with torch.no_grad():
        model(input_ids=ids)  # not a training forward: the weight waits for the next one
    assert model.meft.locality.term() is None
    step()
    assert model.meft.locality.term() is not None
    step()  # the weight was for one forward only
    assert model.meft.locality.term() is None
    model.meft.close()


def _step_with_term(model, parts: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    total = 0.0
    for ids, w in zip(parts, weights):
        model.meft.locality.set_weight(w)
        loss, _ = model.meft.locality.with_term(model(input_ids=ids, labels=ids).loss, LAM)
        (loss / len(parts)).backward()
        total += float(loss.detach()) / len(parts)
    model.meft.optimizer.step()
    model.meft.optimizer.zero_grad()
    return total


@pytest.mark.parametrize("offload", [True, False])
def test_grad_accumulation_4x1_equals_1x4_with_the_term(offload):
    """One micro-batch of 4 sequences with weight w equals 4 micro-batches of 1 with their parts of w, each part
    scaled by 4 (each micro-batch's term is its own mean, as `meft train` normalises it; the loss is divided by 4)."""
    ids = batch(4, 10)
    w = _weight(ids, seed=1) / 40  # [40]
    m1 = _trained(offload=offload, **ALL_ROWS)
    m4 = _trained(offload=offload, grad_accum_steps=4, **ALL_ROWS)
    l1 = [_step_with_term(m1, [ids], [w]) for _ in range(2)]
    l4 = [_step_with_term(m4, list(ids.chunk(4)), [4 * p for p in w.chunk(4)]) for _ in range(2)]
    torch.testing.assert_close(torch.tensor(l4), torch.tensor(l1), rtol=1e-6, atol=1e-6)
    for a, b in zip(adapter_state(m4), adapter_state(m1)):  # tolerance as test_layer's accumulation test
        assert ((a - b).abs() > 1e-7).float().mean() < 1e-2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_zero_copy_equals_staged_with_the_term():
    ids = batch(4, 10)
    w = _weight(ids, seed=2) / 40
    runs = {}
    for mode in ("staged", "zero_copy"):
        model = _trained(fetch_mode=mode, wire_dtype="bfloat16", locality_weight=LAM)
        assert model.meft.scheduler.zero_copy == (mode == "zero_copy")
        losses = [_step_with_term(model, [ids], [w]) for _ in range(4)]
        runs[mode] = (losses, adapter_state(model))
        model.meft.close()
    (l_st, w_st), (l_zc, w_zc) = runs["staged"], runs["zero_copy"]
    assert l_zc == l_st
    for a, b in zip(w_zc, w_st):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_step_with_the_term_issues_no_sync_in_the_adapter_path():
    model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=48, locality_weight=LAM))
    model.train()
    ids = batch(4, 12)
    w = _weight(ids, seed=3)
    for step in range(2):  # step 0 warms up; step 1 is counted
        counter = SyncCounter()
        with counter if step == 1 else torch.enable_grad():
            model.meft.locality.set_weight(w)
            loss, _ = model.meft.locality.with_term(model(input_ids=ids, labels=ids).loss, LAM)
            loss.backward()
        model.meft.optimizer.step()
        model.meft.optimizer.zero_grad()
    assert _ours(counter) == {}, f"sync-class ops in the adapter path: {_ours(counter)}"
    model.meft.close()


def test_bad_weights_and_options_are_clear_errors():
    model = _trained(steps=1)
    ids = batch(2, 8)
    model.meft.locality.set_weight(torch.ones(ids.numel() + 1))
    with pytest.raises(ValueError, match=r"locality weight has 17 entries but adapter 0 .* sees 16 tokens"):
        model(input_ids=ids)
    with pytest.raises(TypeError, match="float tensor"):
        model.meft.locality.set_weight(torch.ones(ids.numel(), dtype=torch.long))
    model.meft.close()
    with pytest.raises(ValueError) as err:
        MeftConfig(locality_weight=-0.1, locality_margin=float("inf"), locality_background=0).validate()
    msg = str(err.value)
    assert "locality_weight = -0.1: a number >= 0 (0 = off)" in msg
    assert "locality_margin = inf: a norm >= 0" in msg
    assert "locality_background = 0: a positive int" in msg
    assert "locality_weight" in MeftConfig.help() and LocalityTerm(0.1).margin == 0.1


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_term_or_refuses(reentrant):
    """Non-reentrant checkpointing: the same term and gradients (backward recomputes the layers); reentrant runs
    the layers without gradients, so the term could not train them: a clear error instead of a silent no-op."""
    ids = batch(2, 12)
    w = _weight(ids, seed=5)
    runs = []
    for ckpt in (False, True):
        model = _trained(offload=False)
        if ckpt:
            kw = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.train()
        model.meft.locality.set_weight(w)
        if ckpt and reentrant:
            with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
                model(input_ids=ids, labels=ids)
            model.meft.close()
            return
        loss, term = model.meft.locality.with_term(model(input_ids=ids, labels=ids).loss, LAM)
        loss.backward()
        runs.append([term] + [lay.grad.clone() for lay in model.meft.scheduler.layers])
        model.meft.close()
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
