"""Lomo / AdaLomo against their unfused references on a tiny real HF Llama (tied embeddings)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from meft.lomo.fused import CHUNK_BYTES
from meft.lomo.optimizers import AdaLomo, Lomo

transformers = pytest.importorskip("transformers")

STEPS = 3


def tiny_llama(seed: int = 0, dtype=torch.float32, checkpointing: str = "off"):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.train()
    if checkpointing != "off":
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def batches(n: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(n)]  # [B, T] token ids


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lomo_steps(model, opt, data, sched=None):
    for ids in data:
        opt.backward(loss_of(model, ids))
        assert all(p.grad is None for p in model.parameters()), "a backbone parameter kept .grad"
        opt.step()
        if sched is not None:
            sched.step()


def lam(step):
    return 1.0 / (1 + step)


@pytest.mark.parametrize("checkpointing", ["off", "reentrant", "non_reentrant"])
def test_lomo_equals_sgd_with_decoupled_weight_decay_bitwise(checkpointing):
    lr, wd = 0.05, 0.1
    model = tiny_llama(checkpointing=checkpointing)
    ref = tiny_llama()  # plain backward, no checkpointing
    opt = Lomo(model, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    lomo_steps(model, opt, batches(), sched)

    sgd = torch.optim.SGD(ref.parameters(), lr=lr, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lam)
    for ids in batches():
        sgd.zero_grad()
        loss_of(ref, ids).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1.0 - sgd.param_groups[0]["lr"] * wd)
        sgd.step()
        ref_sched.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)  # training moved it


@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 100])  # whole tensors; one row per chunk
def test_adalomo_matches_transformers_adafactor(chunk_bytes):
    kw = dict(lr=0.01, eps=(1e-30, 1e-3), clip_threshold=0.5, decay_rate=-0.8, weight_decay=0.05)
    model, ref = tiny_llama(), tiny_llama()
    opt = AdaLomo(model, chunk_bytes=chunk_bytes, **kw)
    lomo_steps(model, opt, batches())
    ada = transformers.optimization.Adafactor(ref.parameters(), beta1=None, scale_parameter=True,
                                              relative_step=False, warmup_init=False, **kw)
    for ids in batches():
        ada.zero_grad()
        loss_of(ref, ids).backward()
        ada.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    w = model.model.layers[0].mlp.up_proj.weight
    assert set(opt.state[w]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert opt.state[w]["exp_avg_sq_row"].shape == (64,) and opt.state[w]["exp_avg_sq_col"].shape == (32,)
    assert "exp_avg_sq" in opt.state[model.model.norm.weight]


@pytest.mark.parametrize("opt_cls", [Lomo, AdaLomo])
def test_two_pass_global_norm_equals_clip_grad_norm_then_update(opt_cls):
    lr, max_norm = 0.05, 0.3
    model, ref = tiny_llama(), tiny_llama()
    opt = opt_cls(model, lr=lr, clip="global", max_norm=max_norm)
    ref_opt = (torch.optim.SGD(ref.parameters(), lr=lr, foreach=False) if opt_cls is Lomo else
               transformers.optimization.Adafactor(ref.parameters(), lr=lr, beta1=None, scale_parameter=True,
                                                   relative_step=False, warmup_init=False))
    for ids in batches():
        loss = loss_of(model, ids)
        before = [p.detach().clone() for p in model.parameters()]
        with opt.norm_pass():
            loss.backward(retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "norm pass updated"
        assert all(p.grad is None for p in model.parameters())
        loss.backward()
        opt.step()

        ref_opt.zero_grad()
        loss_of(ref, ids).backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, foreach=False)
        assert total > max_norm  # clipping is active
        assert torch.equal(opt.last_grad_norm, total)
        ref_opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        if opt_cls is Lomo:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_global_clip_update_pass_refuses_without_fresh_norm_pass():
    model = tiny_llama()
    opt = Lomo(model, lr=0.1, clip="global")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="norm pass"):
        loss_of(model, batches(1)[0]).backward()  # update pass without a norm pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p in model.parameters():
        p.grad = None  # the failed backward left gradients behind
    opt.backward(loss_of(model, batches(1)[0]))
    opt.step()
    with pytest.raises(RuntimeError, match="norm pass"):  # the norm was consumed by the last step
        loss_of(model, batches(1)[0]).backward()
    for p in model.parameters():
        p.grad = None
    loss = loss_of(model, batches(1)[0])
    with opt.norm_pass():
        loss.backward(retain_graph=True)
    with opt.norm_pass():  # a repeated norm pass replaces the pending norm: nothing was updated yet
        loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="update pass"):
        opt.step()  # norm pass without its update pass: refused, and the step is closed
    opt.backward(loss_of(model, batches(1)[0]))  # the next step starts clean
    opt.step()
    with pytest.raises(ValueError, match="clip='global'"):
        Lomo(tiny_llama(), lr=0.1).norm_pass().__enter__()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_3_plus_3_equals_6(dtype):
    kw = dict(lr=0.01, weight_decay=0.01, clip="tensor", max_norm=0.5, stochastic_rounding=True, seed=7)
    data = batches(6)
    straight = tiny_llama(dtype=dtype)
    opt = AdaLomo(straight, **kw)
    lomo_steps(straight, opt, data)

    first = tiny_llama(dtype=dtype)
    opt1 = AdaLomo(first, **kw)
    lomo_steps(first, opt1, data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    opt1.remove_hooks()
    buf.seek(0)
    saved = torch.load(buf)
    resumed = tiny_llama(seed=123, dtype=dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = AdaLomo(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    state = opt2.state[resumed.model.layers[0].mlp.up_proj.weight]
    assert state["step"] == 3 and state["exp_avg_sq_row"].dtype == torch.float32
    lomo_steps(resumed, opt2, data[3:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_is_refused():
    model = tiny_llama()
    opt = Lomo(model, lr=0.1)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    loss_of(model, batches(1)[0]).backward()  # fine: step() ended the previous step
    with pytest.raises(RuntimeError, match="accumulation"):
        loss_of(model, batches(1)[0]).backward()  # a second backward in the same step
    assert opt.steps_done == 1


def test_fp16_grad_scaler_and_fp16_params_are_refused():
    model = tiny_llama()
    opt = Lomo(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    with pytest.raises(ValueError, match="fp16"):
        Lomo(torch.nn.Linear(4, 4).half(), lr=0.1)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
def test_step_misuse_and_ownership():
    model = tiny_llama()
    opt = Lomo(model, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="already updated by another"):
        Lomo(model, lr=0.1)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="listed twice"):
        Lomo([fresh.lm_head.weight, fresh.model.embed_tokens.weight], lr=0.1)
    Lomo(fresh, lr=0.1)  # the failed construction left no hook behind
    opt.remove_hooks()
    loss_of(model, batches(1)[0]).backward()
    assert model.lm_head.weight.grad is not None  # detached: plain autograd again
    with pytest.raises(RuntimeError, match="holds .grad"):
        Lomo(model, lr=0.1).step()
    with pytest.raises(ValueError, match="clip="):
        Lomo(torch.nn.Linear(2, 2), clip="norm")


def test_params_not_owned_are_left_alone():
    model, ref = tiny_llama(), tiny_llama()
    mlp = [p for n, p in model.named_parameters() if "mlp" in n]
    rest = [p for n, p in model.named_parameters() if "mlp" not in n]
    opt = Lomo(mlp, lr=0.05)
    other = torch.optim.SGD(rest, lr=0.05)
    for ids in batches():
        opt.backward(loss_of(model, ids))
        assert all(p.grad is None for p in mlp) and all(p.grad is not None for p in rest)
        opt.step()
        other.step()
        other.zero_grad()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False)
    for ids in batches():
        sgd.zero_grad()
        loss_of(ref, ids).backward()
        sgd.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_value_and_tensor_clipping_match_plain_clipping():
    for clip in ("value", "tensor"):
        model, ref = tiny_llama(), copy.deepcopy(tiny_llama())
        opt = Lomo(model, lr=0.05, clip=clip, max_norm=0.01)
        lomo_steps(model, opt, batches(1))
        loss_of(ref, batches(1)[0]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                if clip == "value":
                    p.grad.clamp_(-0.01, 0.01)
                else:
                    torch.nn.utils.clip_grad_norm_([p], 0.01, foreach=False)
                p.add_(p.grad, alpha=-0.05)
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (clip, name)


def test_non_finite_global_norm_skips_the_step():
    lin = torch.nn.Linear(4, 4)
    before = [p.detach().clone() for p in lin.parameters()]
    opt = Lomo(lin, lr=0.1, clip="global")
    opt.backward(lin(torch.full((1, 4), float("inf"))).sum())
    opt.step()
    assert opt.skipped_steps == 1 and not torch.isfinite(opt.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert all(p.grad is None for p in lin.parameters())
    opt.backward(lin(torch.ones(1, 4)).sum())
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(before[0], lin.weight)
