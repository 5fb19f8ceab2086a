"""Chunked updates (meft.lomo.chunks.Chunks) against whole-tensor plain twins, and the memory they save."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from meft.lomo.chunks import Chunks
from meft.lomo.optimizers import AdaLomo, Lomo
from meft.lomo.rounding import bf16_noise, rounding_generator, stochastic_round_bf16
from tests.meft.lomo.test_optimizers import batches, lomo_steps, loss_of, tiny_llama

TINY_CHUNK = 100  # bytes of fp32: one row per chunk of the tiny Llama's matrices, 25 elements of its vectors


def plain_update(kind: str, p: torch.Tensor, g32: torch.Tensor, state: dict, kw: dict) -> torch.Tensor:
    """The whole-tensor update (the implementation before chunking); returns the new parameter in fp32."""
    p32 = p.float()
    state["step"] = state.get("step", 0) + 1
    if kind == "lomo":
        return p32.mul_(1.0 - kw["lr"] * kw["weight_decay"]).add_(g32, alpha=-kw["lr"])
    rms_p = torch.linalg.vector_norm(p32) / math.sqrt(p32.numel())
    lr_t = torch.clamp(rms_p, min=1e-3) * kw["lr"]
    beta2t = 1.0 - math.pow(state["step"], -0.8)
    sq = g32.square().add_(1e-30)
    if p.dim() >= 2:
        row = state.setdefault("row", torch.zeros(p.shape[:-1]))  # [.., R]
        col = state.setdefault("col", torch.zeros(p.shape[:-2] + p.shape[-1:]))  # [.., C]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        update = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt() * g32
    else:
        v = state.setdefault("v", torch.zeros(p.shape))
        v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
        update = v.rsqrt() * g32
    rms_u = torch.linalg.vector_norm(update) / math.sqrt(update.numel())
    update = update / (rms_u / kw["clip_threshold"]).clamp(min=1.0) * lr_t
    return p32.mul_(1.0 - kw["weight_decay"] * lr_t).sub_(update)


def plain_steps(kind: str, model, data, kw: dict, clip: str, stochastic: bool) -> None:
    """Plain autograd, then each parameter's whole-tensor update in parameter order (its optimizer index)."""
    states: dict[int, dict] = {}
    for ids in data:
        for p in model.parameters():
            p.grad = None
        loss_of(model, ids).backward()
        with torch.no_grad():
            for idx, p in enumerate(model.parameters()):
                g32 = p.grad.float()
                if clip == "value":
                    g32.clamp_(-kw["max_norm"], kw["max_norm"])
                elif clip == "tensor":
                    g32.mul_(torch.clamp(kw["max_norm"] / (torch.linalg.vector_norm(g32) + 1e-6), max=1.0))
                state = states.setdefault(idx, {})
                p32 = plain_update(kind, p, g32, state, kw)
                if stochastic and p.dtype == torch.bfloat16:
                    gen = rounding_generator(torch.Generator(), kw["seed"], idx, state["step"])
                    p.copy_(stochastic_round_bf16(p32, bf16_noise(p32.shape, gen, p32.device)))
                else:
                    p.copy_(p32)


CASES = [  # (optimizer, dtype, stochastic rounding, clip): every clip path and the rounding path once each
    ("lomo", torch.float32, False, "none"),
    ("lomo", torch.float32, False, "tensor"),
    ("lomo", torch.bfloat16, False, "value"),
    ("lomo", torch.bfloat16, True, "tensor"),
    ("adalomo", torch.float32, False, "none"),
    ("adalomo", torch.float32, False, "value"),
    ("adalomo", torch.bfloat16, False, "tensor"),
    ("adalomo", torch.bfloat16, True, "none"),
]


@pytest.mark.parametrize(("kind", "dtype", "stochastic", "clip"), CASES)
def test_chunked_update_equals_whole_tensor_plain_twin(kind, dtype, stochastic, clip):
    kw = {"lr": 0.02, "weight_decay": 0.1, "clip_threshold": 0.5, "max_norm": 0.05, "seed": 3}
    model, ref = tiny_llama(dtype=dtype), tiny_llama(dtype=dtype)
    common = dict(lr=kw["lr"], weight_decay=kw["weight_decay"], clip=clip, max_norm=kw["max_norm"],
                  stochastic_rounding=stochastic, seed=kw["seed"], chunk_bytes=TINY_CHUNK)
    opt = (Lomo(model, **common) if kind == "lomo" else
           AdaLomo(model, clip_threshold=kw["clip_threshold"], **common))
    assert len(Chunks(model.lm_head.weight, model.lm_head.weight, TINY_CHUNK)) == 128  # really chunked
    assert len(Chunks(model.model.norm.weight, model.model.norm.weight, TINY_CHUNK)) == 2
    lomo_steps(model, opt, batches())
    plain_steps(kind, ref, batches(), kw, clip, stochastic)
    # Lomo is elementwise: bitwise equal. AdaLomo sums column means and its update RMS chunk by chunk:
    # equal up to fp32 rounding (bf16: the default tolerance allows the rare one-ulp rounding flip).
    tol = {"rtol": 0, "atol": 0} if kind == "lomo" else {}
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_llama(dtype=dtype).lm_head.weight)  # training moved it


def test_chunked_adalomo_3d_parameter_equals_plain_twin():
    # factored statistics of a [A, R, C] tensor: rows [A, R] chunk with it, columns [A, C] are summed
    kw = {"lr": 0.05, "weight_decay": 0.0, "clip_threshold": 1.0}
    torch.manual_seed(0)
    w0, x = torch.randn(3, 10, 7), torch.randn(3, 7, 5)
    w, w_ref = torch.nn.Parameter(w0.clone()), w0.clone()
    opt = AdaLomo([w], lr=kw["lr"], chunk_bytes=3 * 3 * 7 * 4)  # 3 rows of every [10, 7] slice per chunk
    state: dict = {}
    for _ in range(3):
        opt.backward(torch.matmul(w, x).tanh().sum())
        opt.step()
        w_grad = torch.func.grad(lambda t: torch.matmul(t, x).tanh().sum())(w_ref)
        w_ref = plain_update("adalomo", w_ref, w_grad, state, kw)
    torch.testing.assert_close(w.detach(), w_ref)


def test_chunk_spans():
    def spans(shape, dtype=torch.float32, chunk_bytes=100):
        t = torch.zeros(shape, dtype=dtype)
        return list(Chunks(t, t, chunk_bytes))
    assert spans((10, 3)) == [(0, 8), (8, 2)]  # 12-byte rows: 8 fit in 100 bytes; the tail is short
    assert spans((10, 3), torch.bfloat16) == [(0, 8), (8, 2)]  # sized by the fp32 working copy
    assert spans((10, 3), torch.float64) == [(0, 4), (4, 4), (8, 2)]
    assert spans((2, 5, 3)) == [(0, 4), (4, 1)]  # rows are dim -2; a row spans the leading dims (24 bytes)
    assert spans((4, 100)) == [(0, 1), (1, 1), (2, 1), (3, 1)]  # at least one row per chunk
    assert spans(()) == [(0, 1)] and spans((0, 4)) == []
    with pytest.raises(ValueError, match="chunk_bytes"):
        Lomo(torch.nn.Linear(2, 2), chunk_bytes=0)


@pytest.mark.parametrize("opt_cls", [Lomo, AdaLomo])
def test_chunked_update_keeps_no_whole_fp32_temporary(opt_cls):
    # A bf16 [4096, 256] parameter (fp32 copy 4 MiB): the peak during backward is the parameter, its bf16
    # gradient and a few chunks, not the whole-tensor fp32 copies of the parameter, gradient and update.
    def peak_mib(chunk_bytes: int) -> float:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4096, 256).bfloat16())
        opt = opt_cls([w], lr=1e-3, stochastic_rounding=True, chunk_bytes=chunk_bytes)
        loss = (w.float().sum(dim=1) * torch.linspace(0, 1, 4096)).sum()  # keeps no [4096, 256] activation
        mt = MemTracker()
        mt.track_external(w)
        with warnings.catch_warnings(), mt:
            warnings.filterwarnings("ignore", message="Expected a tensor")  # MemTracker's hook after ours
            opt.backward(loss)
        opt.step()
        (snap,) = mt.get_tracker_snapshot("peak").values()
        return snap["Total"] / 2**20

    param, fp32 = 2.0, 4.0  # MiB: the bf16 parameter (and its gradient), and any whole fp32 copy of it
    chunked, whole = peak_mib(64 * 2**10), peak_mib(64 * 2**20)
    assert chunked <= 2 * param + 1.0, chunked  # measured 4.3 (Lomo), 4.5 (AdaLomo)
    # one chunk: fp32 parameter, gradient (AdaLomo: and update) and the rounding's int32 noise and bits
    assert whole >= chunked + 4 * fp32, (whole, chunked)  # measured 23.0, 31.1


@pytest.mark.parametrize("opt_cls", [Lomo, AdaLomo])
def test_no_single_allocation_of_a_whole_fp32_copy(opt_cls):
    # The profiler also sees allocations inside composite ops, which MemTracker does not (on CPU,
    # vector_norm(bf16, dtype=fp32) casts a whole copy first). Clip "tensor" takes a norm of the gradient,
    # AdaLomo one of the parameter too; stochastic rounding draws noise.
    w = torch.nn.Parameter(torch.randn(4096, 256).bfloat16())  # 2 MiB; an fp32 copy would be 4 MiB
    opt = opt_cls([w], lr=1e-3, clip="tensor", stochastic_rounding=True, chunk_bytes=64 * 2**10)
    loss = (w * 2.0).sum()  # its backward allocates the 2 MiB bf16 gradient
    with warnings.catch_warnings(), torch.profiler.profile(profile_memory=True) as prof:
        warnings.filterwarnings("ignore")
        opt.backward(loss)
    opt.step()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= w.numel() * w.element_size(), largest
