"""Packed micro-batches (`meft.data.packed`) against their padded twin: layout, loss, gradients, training."""

import pytest
import torch

import meft
from meft.data.packed import pack_batch, packing_supported, resolve_packing
from meft.data.records import IGNORE_INDEX
from meft.train.loop import train_step
from meft.train.loss import causal_lm_loss
from tests.meft.adapter.test_wrap import adapter_state, small_config, tiny_model

PREFIX = [5, 6, 7, 8, 9]  # the chat template's header every example starts with
LENGTHS = [11, 14, 9, 13]  # real tokens per example; width 14 after right padding


def _qa_batch(labels_from: int | None = None) -> dict[str, torch.Tensor]:
    """4 right-padded examples: the shared prefix, a random question, a 2-3 token labelled answer."""
    g = torch.Generator().manual_seed(0)
    B, T = len(LENGTHS), max(LENGTHS)
    ids = torch.zeros(B, T, dtype=torch.long)  # pad id 0
    labels = torch.full((B, T), IGNORE_INDEX)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        row = torch.tensor(PREFIX + torch.randint(10, 90, (n - len(PREFIX),), generator=g).tolist())
        ids[i, :n], mask[i, :n] = row, 1
        start = n - 2 - i % 2 if labels_from is None else labels_from
        labels[i, start:n] = row[start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_layout():
    batch = _qa_batch()
    packed = pack_batch(batch)
    P = len(PREFIX)
    L = P + sum(n - P for n in LENGTHS)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, L)
    assert packed["attention_mask"].shape == (1, 1, L, L)
    assert packed["input_ids"][0, :P].tolist() == PREFIX  # once
    expected_pos = list(range(P)) + [p for n in LENGTHS for p in range(P, n)]
    assert packed["position_ids"][0].tolist() == expected_pos  # each token at its padded-layout position
    # the same labelled tokens, in order
    padded_labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
    torch.testing.assert_close(packed["labels"][packed["labels"] != IGNORE_INDEX], padded_labels)
    visible = packed["attention_mask"][0, 0] == 0  # [L, L]
    start1 = P + (LENGTHS[0] - P)  # first token of example 1
    assert visible[start1, :P].all() and not visible[start1, P:start1].any()  # sees the prefix, not example 0
    assert visible[start1, start1] and not visible[start1, start1 + 1]  # causal
    assert not visible[:P, P:].any()  # the prefix sees only itself


def test_prefix_is_cut_before_the_first_label_and_bad_layouts_stay_padded():
    batch = _qa_batch(labels_from=3)  # labels inside the common prefix: position 2 predicts label 3
    packed = pack_batch(batch)
    assert packed["input_ids"].shape[1] == 2 + sum(n - 2 for n in LENGTHS)  # only 2 shared tokens
    torch.testing.assert_close(packed["labels"][packed["labels"] != IGNORE_INDEX],
                               batch["labels"][batch["labels"] != IGNORE_INDEX])
    left = {k: v.flip(1) for k, v in _qa_batch().items()}  # left padding: not this layout
    assert pack_batch(left) is None
    assert pack_batch(_qa_batch(), max_tokens=20) is None  # too long for a dense [L, L] mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(arch, attn):
    batch = _qa_batch()
    padded_model, packed_model = tiny_model(arch), tiny_model(arch)
    for m in (padded_model, packed_model):
        m.config._attn_implementation = attn
        m.train()
    assert packing_supported(packed_model)
    plain = causal_lm_loss(padded_model, batch)
    packed = causal_lm_loss(packed_model, pack_batch(batch))
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    plain.backward()
    packed.backward()
    for (n, a), b in zip(packed_model.named_parameters(), padded_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


CUDA = pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                             reason="needs a CUDA device (none on this machine)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("backbone", ["frozen", "lomo"])
def test_packed_training_equals_padded_training(backbone, device):
    """3 `meft train` steps (train_step) packed vs padded: losses, adapter rows, gates and backbone weights.
    The budget holds every row, so routing is the same in both (packed, the shared prefix counts once).
    On CUDA the packed additive mask goes through CUDA SDPA and the rows over the TransferScheduler."""
    def run(pack: bool):
        cfg = small_config(max_active_rows=256, backbone=backbone, backbone_lr=1e-2)
        model = meft.wrap(tiny_model("llama").to(device), cfg)
        model.train()
        losses = [train_step(model, model.meft, [_qa_batch()], 1, pack=pack)[0] for _ in range(3)]
        state = [t.detach().cpu() for t in adapter_state(model) + list(model.parameters())]
        meft.unwrap(model)  # closes the runtime (scheduler threads, CUDA streams)
        return losses, state

    (packed_loss, packed_state), (plain_loss, plain_state) = run(True), run(False)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=1e-6 if device == "cpu" else 1e-5)
    assert packed_loss[-1] < packed_loss[0]
    for a, b in zip(packed_state, plain_state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resolve_packing():
    llama, opt = tiny_model("llama"), tiny_model("opt")
    assert resolve_packing("auto", llama) and resolve_packing("on", llama)
    assert not resolve_packing("auto", opt) and not resolve_packing("off", llama)
    with pytest.raises(ValueError, match="--packing on: model type 'opt'.*fix: --packing auto"):
        resolve_packing("on", opt)
    with pytest.raises(ValueError, match="--packing 'yes': choose one of auto, on, off"):
        resolve_packing("yes", llama)


def test_a_sliding_window_shorter_than_the_batch_keeps_it_padded():
    """The packed mask has no sliding window: a batch wider than the model's window stays padded."""
    from meft.train.loop import lay_out

    model = tiny_model("mistral")
    batch = _qa_batch()
    assert lay_out(model, batch, True)["input_ids"].shape[0] == 1  # packed
    model.config.sliding_window = max(LENGTHS) - 1
    assert lay_out(model, batch, True) is batch
