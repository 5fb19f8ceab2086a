"""The locality term in `meft train`'s step (`meft.train.loop.train_step`): off is today's step bit for bit,
Lomo's fused backward sees LM loss + lambda x term, and a Trainer adds the term in `compute_loss`."""

import pytest
import torch
from torch.utils.data import IterableDataset

import meft
from meft.config import MeftConfig
from meft.data.locality import with_background
from meft.train.loop import lay_out, train_step
from meft.train.loss import step_loss
from tests.meft.adapter.test_wrap import adapter_state, batch, small_config, tiny_model, train
from tests.meft.data.test_locality import BACKGROUND
from tests.meft.data.test_packed import _qa_batch

LAM = 0.5


def _todays_step(model, rt, batches, accum, pack):
    """`train_step` as it was before the locality term existed (the reference for locality_weight=0)."""
    loss_sum = 0.0
    for b in batches:
        b = {k: v.to(rt.device) for k, v in lay_out(model, b, pack).items()}
        loss = step_loss(model, b, rt.backbone_optimizer) / accum
        if rt.backbone_optimizer is not None:
            rt.backbone_optimizer.backward(loss)
        else:
            loss.backward()
        loss_sum += float(loss.detach())
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    if rt.backbone_optimizer is not None:
        rt.backbone_optimizer.step()
    return loss_sum


@pytest.mark.parametrize("pack,accum,backbone", [(True, 1, "frozen"), (False, 2, "frozen"), (True, 1, "lomo")])
def test_locality_weight_zero_is_todays_step_bitwise(pack, accum, backbone):
    runs = []
    for step_fn in ("train_step", "today"):
        model = meft.wrap(tiny_model("llama"), small_config(grad_accum_steps=accum, backbone=backbone))
        model.train()
        losses = []
        for _ in range(3):
            batches = [_qa_batch() for _ in range(accum)]
            if step_fn == "train_step":
                stats = {}
                losses.append(train_step(model, model.meft, batches, accum, pack=pack, stats=stats)[0])
                assert stats == {}  # no term, none reported
            else:
                losses.append(_todays_step(model, model.meft, batches, accum, pack))
        runs.append((losses, adapter_state(model), [p.detach().clone() for p in model.parameters()]))
        model.meft.close()
    (l_new, a_new, p_new), (l_old, a_old, p_old) = runs
    assert l_new == l_old
    for a, b in zip(a_new + p_new, a_old + p_old):
        assert torch.equal(a, b)


def test_the_term_changes_the_step_and_is_reported():
    runs = {}
    for lam in (0.0, LAM):
        model = meft.wrap(tiny_model("llama"), small_config(locality_weight=LAM))
        model.train()
        stats_seen = []
        for _ in range(3):
            stats = {}
            train_step(model, model.meft, [with_background(_qa_batch(), BACKGROUND, 0)], 1, pack=True,
                       locality_weight=lam, stats=stats)
            stats_seen.append(stats["locality"])
        runs[lam] = (stats_seen, adapter_state(model))
        model.meft.close()
    assert runs[LAM][0][0] == runs[0.0][0][0] == 0.0  # values start at zero: no adapter output yet
    assert runs[0.0][0][-1] > runs[LAM][0][-1] > 0  # the term pushes the background's output down
    assert not torch.equal(runs[LAM][1][0], runs[0.0][1][0])


def test_lomo_updates_the_backbone_with_the_full_loss():
    """Lomo's update happens inside backward: with the term on, one step moves each backbone weight by
    -lr x d(LM loss + lambda x term)/dw, the gradient a plain autograd pass of that loss gives."""
    lr = 1e-2
    prep = small_config(max_active_rows=256)
    start = meft.wrap(tiny_model("llama"), prep)
    train(start, _qa_batch()["input_ids"], 2)  # adapter values off zero, so the term has a gradient
    rows = [s.weights.clone() for s in start.meft.stores]
    gates = [ad.gate.detach().clone() for ad in start.meft.adapters]
    start.meft.close()

    def fresh(backbone):
        model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=256, backbone=backbone, backbone_lr=lr,
                                                            locality_weight=LAM))
        for store, w in zip(model.meft.stores, rows):
            store.weights.copy_(w)
        model.meft.stores_changed()
        with torch.no_grad():
            for ad, g in zip(model.meft.adapters, gates):
                ad.gate.copy_(g)
        model.train()
        return model

    b = with_background(_qa_batch(), BACKGROUND, 0)
    lomo = fresh("lomo")
    before = [p.detach().clone() for p in lomo.meft.backbone_params]
    train_step(lomo, lomo.meft, [b], 1, pack=True, locality_weight=LAM)
    moved = [p.detach() - q for p, q in zip(lomo.meft.backbone_params, before)]

    plain = fresh("frozen")
    params = plain.meft.backbone_params  # frozen by wrap: unfrozen here for the plain gradient
    for p in params:
        p.requires_grad_(True)
    laid = {k: v for k, v in lay_out(plain, b, True).items()}
    plain.meft.locality.set_weight(laid.pop("background_weight"))
    loss, term = plain.meft.locality.with_term(plain(**laid).loss, LAM)
    assert float(term) > 0
    loss.backward()
    assert len(params) == len(moved)
    for m, p in zip(moved, params):
        torch.testing.assert_close(m, -lr * p.grad, rtol=1e-3, atol=1e-7)
    lomo.meft.close()
    plain.meft.close()


def test_old_config_without_the_locality_fields_loads_with_the_term_off():
    old = {k: v for k, v in MeftConfig().to_dict().items() if not k.startswith("locality")}
    cfg = MeftConfig.from_dict(old)
    assert cfg.locality_weight == 0.0 and cfg.locality_background == 4
    assert MeftConfig.from_json(MeftConfig(locality_weight=0.1, locality_margin=0.5).to_json()).locality_margin == 0.5


def test_trainer_adds_the_term_in_compute_loss(tmp_path):
    """`MeftCallback`'s documented recipe: a Trainer whose compute_loss sets the background weight and adds
    the term trains as the plain loop with the term does."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from meft.train.hf_callback import MeftCallback, locality_loss

    ids = batch(4, 10)
    w = torch.zeros(4, 10)
    w[2:] = 1.0 / 20  # rows 2 and 3 are background: the mean over their 20 tokens
    labels = ids.clone()
    labels[2:] = -100

    class Rows(IterableDataset):
        def __iter__(self):
            while True:
                for i in range(4):
                    yield {"input_ids": ids[i], "labels": labels[i], "background_weight": w[i]}

    plain = meft.wrap(tiny_model("llama"), small_config(locality_weight=LAM))
    plain.train()
    want = []
    for _ in range(4):
        plain.meft.locality.set_weight(w)
        loss, _ = plain.meft.locality.with_term(plain(input_ids=ids, labels=labels).loss, LAM)
        loss.backward()
        plain.meft.optimizer.step()
        plain.meft.optimizer.zero_grad()
        want.append(float(loss.detach()))
    want_state = adapter_state(plain)
    plain.meft.close()

    class LocalityTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            return locality_loss(model, inputs, return_outputs=return_outputs)

    model = meft.wrap(tiny_model("llama"), small_config(locality_weight=LAM))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, lr_scheduler_type="constant",
        max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    tr = LocalityTrainer(model=model, args=args, train_dataset=Rows(), optimizers=(model.meft.optimizer, None),
                         callbacks=[MeftCallback()])
    tr.train()
    got = [h["loss"] for h in tr.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-3)
    assert any(h.get("meft/locality", 0) > 0 for h in tr.state.log_history)
    for a, b in zip(adapter_state(model), want_state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.meft.close()
