"""Stochastic rounding to bf16: fast path == plain twin, unbiased, deterministic; its effect in Lomo."""

from __future__ import annotations

import torch

from meft.lomo.optimizers import AdaLomo, Lomo
from meft.lomo.rounding import bf16_noise, reference_stochastic_round_bf16, rounding_generator, stochastic_round_bf16


def _values(n: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)  # [n] many binades, both signs
    return torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -3.0, 1e-40, -1e-40])])


def test_fast_path_equals_plain_twin_bitwise():
    x = _values()
    noise = bf16_noise(x.shape, torch.Generator().manual_seed(1), x.device)
    fast = stochastic_round_bf16(x, noise)
    twin = reference_stochastic_round_bf16(x, noise)
    assert torch.equal(fast.view(torch.int16), twin.view(torch.int16))
    for extreme in (0, 65535):  # all-down and all-up noise
        n = torch.full_like(noise, extreme)
        torch.testing.assert_close(stochastic_round_bf16(x, n), reference_stochastic_round_bf16(x, n),
                                   rtol=0, atol=0)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = stochastic_round_bf16(special, torch.full((3,), 65535, dtype=torch.int32))
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan()


def test_unbiased_within_stated_tolerance():
    # N = 2^20 draws per value: the mean's standard error is at most 0.5 ulp / 1024 ~ 5e-4 ulp;
    # we require |mean - x| < 3e-3 ulp (6 sigma), while rounding to nearest is off by up to 0.5 ulp.
    n = 1 << 20
    gen = torch.Generator().manual_seed(2)
    for x in (1.0 + 2**-9, 1.0 + 3 * 2**-10, -3.14159, 1e-3 * 1.2345):
        src = torch.full((n,), x, dtype=torch.float32)
        lo = src[:1].to(torch.bfloat16).double()
        ulp = (torch.nextafter(lo.to(torch.bfloat16), lo.to(torch.bfloat16) * 2).double() - lo).abs().item()
        mean = stochastic_round_bf16(src, bf16_noise(src.shape, gen, src.device)).double().mean().item()
        assert abs(mean - src[0].double().item()) < 3e-3 * ulp, x
        nearest_err = abs(src[:1].to(torch.bfloat16).double().item() - src[0].double().item())
        assert nearest_err > 0.05 * ulp  # the values are really between two bf16 neighbours


def test_deterministic_under_seed():
    x = _values()
    gen = torch.Generator()
    a = stochastic_round_bf16(x, bf16_noise(x.shape, rounding_generator(gen, 5, 3, 10), x.device))
    b = stochastic_round_bf16(x, bf16_noise(x.shape, rounding_generator(gen, 5, 3, 10), x.device))
    c = stochastic_round_bf16(x, bf16_noise(x.shape, rounding_generator(gen, 6, 3, 10), x.device))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _train_bf16(stochastic: bool, seed: int = 0, steps: int = 20) -> torch.Tensor:
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = Lomo([w], lr=1e-4, stochastic_rounding=stochastic, seed=seed)
    for _ in range(steps):
        w.sum().backward()  # grad 1: each step moves w by -1e-4, far below half a bf16 ulp at 1.0 (2^-8)
        opt.step()
    return w.detach()


def test_lomo_bf16_small_updates_survive_only_with_stochastic_rounding():
    assert torch.equal(_train_bf16(False), torch.ones(4096, dtype=torch.bfloat16))  # lost
    w = _train_bf16(True)
    # expected 1 - 20e-4 = 0.998; 4096 params, per-param std ~ sqrt(20 * p(1-p)) * ulp, mean well inside
    torch.testing.assert_close(w.double().mean().item(), 1 - 20e-4, rtol=0, atol=2e-4)
    assert torch.equal(w, _train_bf16(True)) and not torch.equal(w, _train_bf16(True, seed=1))


def test_adalomo_bf16_runs_and_keeps_fp32_state():
    lin = torch.nn.Linear(8, 8).to(torch.bfloat16)
    opt = AdaLomo(lin, lr=1e-2, stochastic_rounding=True)
    for _ in range(3):
        lin(torch.ones(2, 8, dtype=torch.bfloat16)).square().mean().backward()
        opt.step()
    state = opt.state[lin.weight]
    assert state["step"] == 3 and state["exp_avg_sq_row"].dtype == torch.float32
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.grad is None
