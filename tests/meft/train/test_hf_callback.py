"""transformers.Trainer + MeftCallback == the plain loop; the callback refuses setups that would train
wrongly, logs the step's traffic and saves a loadable adapter at every Trainer save."""

import os

import pytest
import torch
from torch.utils.data import IterableDataset

import meft
from meft.train.hf_callback import ADAPTER_DIR, MeftCallback
from tests.meft.adapter.test_wrap import adapter_state, batch, small_config, tiny_model, train

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Rows(IterableDataset):
    """The rows of `ids` in order, forever (an IterableDataset: Trainer neither shuffles nor samples)."""
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __iter__(self):
        while True:
            for row in self.ids:
                yield {"input_ids": row, "labels": row}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, lr_scheduler_type="constant",
                max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(model, args, callbacks=None, optimizers=None):
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows(batch(4, 10)),
                                optimizers=optimizers or (model.meft.optimizer, None),
                                callbacks=callbacks if callbacks is not None else [MeftCallback()])


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_equals_plain_loop(tmp_path, accum):
    """Same batches, same optimizer: Trainer's losses and final host rows + gates == the plain loop's."""
    ids = batch(4, 10)
    plain = meft.wrap(tiny_model("llama"), small_config(grad_accum_steps=accum))
    want_losses = train(plain, ids, 6, accum=accum)
    want = adapter_state(plain)
    plain.meft.close()

    model = meft.wrap(tiny_model("llama"), small_config(grad_accum_steps=accum))
    tr = _trainer(model, _args(tmp_path, per_device_train_batch_size=4 // accum, gradient_accumulation_steps=accum))
    tr.train()
    got_losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=0, atol=1e-3)
    for a, b in zip(adapter_state(model), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    mb_down = [h["meft/mb_down"] for h in tr.state.log_history if "meft/mb_down" in h]
    assert len(mb_down) == 6 and all(x > 0 for x in mb_down)  # every step moved rows down
    model.meft.close()


def test_trainer_save_writes_loadable_adapter(tmp_path):
    model = meft.wrap(tiny_model("llama"), small_config())
    tr = _trainer(model, _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_only_model=True))
    tr.train()
    folder = tmp_path / "checkpoint-4" / ADAPTER_DIR
    assert (tmp_path / "checkpoint-2" / ADAPTER_DIR).is_dir() and folder.is_dir()
    assert not [n for n in os.listdir(tmp_path / "checkpoint-4") if n.endswith(".tmp")]
    ids = batch(2, 8, seed=5)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    fresh = meft.load_adapter(tiny_model("llama"), str(folder), verbose=False)  # wraps, then loads
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)
    model.meft.close()
    fresh.meft.close()


@pytest.mark.parametrize("case,match", [
    ("own_optimizer", r"optimizers=\(model.meft.optimizer, None\)"),
    ("max_grad_norm", r"max_grad_norm=1.0 .*MeftConfig\(clip='global'"),
    ("accum", r"gradient_accumulation_steps=2 but MeftConfig.grad_accum_steps=1"),
    ("lomo", r"backbone='lomo'.*backbone='frozen'"),
    ("unwrapped", r"not wrapped"),
])
def test_callback_refuses_wrong_setups(tmp_path, case, match):
    args = _args(tmp_path, max_steps=1, max_grad_norm=1.0 if case == "max_grad_norm" else 0.0,
                 gradient_accumulation_steps=2 if case == "accum" else 1)
    if case == "unwrapped":
        tr = transformers.Trainer(model=tiny_model("llama"), args=args, train_dataset=_Rows(batch(4, 10)),
                                  callbacks=[MeftCallback()])
        with pytest.raises(ValueError, match=match):
            tr.train()
        return
    cfg = small_config(backbone="lomo", backbone_lr=1e-3) if case == "lomo" else small_config()
    model = meft.wrap(tiny_model("llama"), cfg)
    own = (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), None)
    tr = _trainer(model, args, optimizers=own if case == "own_optimizer" else None)
    with pytest.raises(ValueError, match=match):
        tr.train()
    model.meft.close()
