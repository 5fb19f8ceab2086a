"""meft.lomo.head (chunked LM head + cross-entropy, tied gradient in one buffer or none) against its plain
twin `model(input_ids, labels=...).loss`, alone and driving Lomo / AdaLomo / AdamW steps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from meft.lomo.head import IGNORE_INDEX, head_loss, lm_loss, lm_loss_supported
from meft.lomo.optimizers import AdaLomo, Lomo

transformers = pytest.importorskip("transformers")

STEPS = 3
V = 128
CHUNK = 32 * 4 * 22  # fp32 bytes: 22 tokens x 32 vocab rows per chunk, so the 128-row vocabulary takes 4+ chunks


def llama(tied: bool, dtype=torch.float32, vocab: int = V, seed: int = 0):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.train()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def data(n: int = STEPS, vocab: int = V, seed: int = 1):
    """[B, T] ids with repeated tokens (the tied embedding sums duplicates) and labels with ignored spans."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab // 2, (2, 12), generator=g)  # half the vocabulary: repeats, untouched rows
        labels = ids.clone()
        labels[0, :4] = IGNORE_INDEX  # a prompt without labels
        out.append((ids, labels))
    return out


def tol(dtype) -> dict:
    # fp32: summation order only (vocabulary chunks, fp32 accumulation of the hidden states' gradient).
    # bf16: the same, surfacing as an ulp of bf16 (2^-8 relative) where a sum lands near a rounding tie
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2e-4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_gradients_equal_plain_twin(tied, dtype):
    ref = llama(tied, dtype)
    model = copy.deepcopy(ref)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight  # deepcopy keeps the tie; make sure
    ids, labels = data(1)[0]
    plain = ref(input_ids=ids, labels=labels).loss
    plain.backward()
    loss = lm_loss(model, ids, labels, chunk_bytes=CHUNK)
    loss.backward()
    torch.testing.assert_close(loss, plain, **tol(dtype))
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        scale = float(p_ref.grad.abs().max())
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_head_loss_alone_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)  # [N, d]
    weight = torch.randn(50, 16, generator=g, requires_grad=True)  # [V, d]
    targets = torch.randint(0, 50, (10,), generator=g)
    targets[3] = IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(plain, (hidden, weight))
    loss = head_loss(hidden, weight, targets, chunk_bytes=4 * 16 * 7)  # 7 vocabulary rows per chunk
    h2, w2 = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(h2, gh)
    torch.testing.assert_close(w2, gw)


def steps(model, opt, batches, use_head: bool, pass_opt: bool = True):
    for ids, labels in batches:
        if use_head:
            loss = lm_loss(model, ids, labels, opt=opt if pass_opt else None, chunk_bytes=CHUNK)
        else:
            loss = model(input_ids=ids, labels=labels).loss
        if isinstance(opt, (Lomo, AdaLomo)):
            opt.backward(loss)
            assert all(p.grad is None for p in model.parameters())
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("clip", ["none", "value"])
def test_lomo_rows_path_equals_fused_reference(tied, dtype, clip):
    """Lomo updating the head's rows inside the loss's backward (no [V, d] gradient) = the reference fused
    Lomo on the plain loss, after 3 steps with weight decay."""
    kw = {"lr": 0.05, "weight_decay": 0.1, "clip": clip, "max_norm": 0.01}
    ref, model = llama(tied, dtype), llama(tied, dtype)
    opt_ref, opt = Lomo(ref, **kw), Lomo(model, **kw)
    assert opt.rows_update_ok(model.lm_head.weight)
    hooks = []
    opt_on_grad = opt._on_grad
    opt._on_grad = lambda p, idx: (p.grad is not None and hooks.append(idx), opt_on_grad(p, idx))
    batches = data()
    steps(ref, opt_ref, batches, use_head=False)
    steps(model, opt, batches, use_head=True)
    assert opt._ids[id(model.lm_head.weight)] not in hooks, "the head's gradient reached the hook"
    assert opt.state[model.lm_head.weight]["step"] == STEPS
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(ref.parameters(), llama(tied, dtype).parameters()))
    assert moved > 1e-3
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, p_ref, **tol(dtype), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["adalomo", "lomo_global", "adamw"])
def test_one_buffer_path_equals_reference(tied, dtype, kind):
    """Optimizers that need the whole gradient (AdaLomo, Lomo with clip='global': two backward passes of the
    same graph, AdamW) get it in one piece, equal to the plain loss's."""
    make = {"adalomo": lambda m: AdaLomo(m, lr=1e-2, weight_decay=0.1),
            "lomo_global": lambda m: Lomo(m, lr=0.05, clip="global", max_norm=0.5),
            "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)}[kind]
    ref, model = llama(tied, dtype), llama(tied, dtype)
    opt_ref, opt = make(ref), make(model)
    if kind != "adamw":
        assert not opt.rows_update_ok(model.lm_head.weight)
    batches = data()
    steps(ref, opt_ref, batches, use_head=False)
    steps(model, opt, batches, use_head=True)
    close = tol(dtype)
    if kind == "adamw":  # Adam divides by sqrt(v): where |g| is tiny, fp32 rounding of g moves the update
        close["atol"] = max(close["atol"], 5e-3 * 1e-2)  # by up to a fraction of lr (seen: 3.4e-3 lr)
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, p_ref, **close, msg=lambda m, n=name: f"{n}: {m}")


def test_second_backward_before_step_is_refused():
    model = llama(True)
    opt = Lomo(model, lr=0.05)
    ids, labels = data(1)[0]
    loss = lm_loss(model, ids, labels, opt=opt)
    loss.backward(retain_graph=True)
    # refused either by Lomo (accumulation) or by autograd (the saved head weight was updated in place)
    with pytest.raises(RuntimeError, match="second gradient|modified by an inplace operation"):
        loss.backward()


def test_refuses_a_head_it_cannot_reproduce():
    model = llama(False)
    assert lm_loss_supported(model) and lm_loss_supported(llama(True))
    model.lm_head = torch.nn.Linear(32, V, bias=True)
    assert not lm_loss_supported(model)  # what `meft train` asks before it takes lm_loss
    ids, labels = data(1)[0]
    with pytest.raises(ValueError, match="plain bias-free"):
        lm_loss(model, ids, labels)


def peak_mib(model, opt, ids, use_head: bool) -> float:
    mt = MemTracker()
    mt.track_external(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Expected a tensor")  # MemTracker's hook after Lomo's
        with mt:
            loss = (lm_loss(model, ids, opt=opt, chunk_bytes=2**20) if use_head
                    else model(input_ids=ids, labels=ids).loss)
            opt.backward(loss)
            opt.step()
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20


@pytest.mark.parametrize("tied", [True, False])
def test_lomo_rows_path_holds_no_vocabulary_gradient(tied):
    """A vocabulary-heavy tiny model: the plain fused step peaks with the [V, d] head gradient and the
    [N, V] logits (8 MiB), their log-softmax and gradient; the rows path (1 MiB logits chunks) saves at least
    the gradient (2 MiB) and two of the logits' copies."""
    vocab = 16384
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    ref, model = llama(tied, vocab=vocab), llama(tied, vocab=vocab)
    plain = peak_mib(ref, Lomo(ref, lr=1e-3), ids, use_head=False)
    head = peak_mib(model, Lomo(model, lr=1e-3), ids, use_head=True)
    grad_mib, logits_mib = vocab * 32 * 4 / 2**20, 2 * 64 * vocab * 4 / 2**20
    assert plain - head >= grad_mib + 2 * logits_mib, (plain, head)


def test_padding_row_gets_no_embedding_gradient():
    """nn.Embedding(padding_idx=...) gives its padding row no gradient from the lookup; the tied lookup
    replacing it must do the same (the head's part of that row remains)."""
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                   tie_word_embeddings=True, pad_token_id=3)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    assert ref.model.embed_tokens.padding_idx == 3
    model = copy.deepcopy(ref)
    ids, labels = data(1)[0]
    ids[:, -3:] = 3  # right padding
    labels[:, -3:] = IGNORE_INDEX
    ref(input_ids=ids, labels=labels).loss.backward()
    lm_loss(model, ids, labels, chunk_bytes=CHUNK).backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6 * float(p_ref.grad.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")
