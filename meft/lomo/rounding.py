"""Stochastic rounding of fp32 values to bfloat16, used by Lomo / AdaLomo when writing updates back.

Owns the fast path (`stochastic_round_bf16`: add 16 random bits below the bf16 mantissa, truncate) and
its plain twin (`reference_stochastic_round_bf16`: pick the lower or upper bf16 neighbour from explicit
probabilities). Both take the same 16-bit noise, so they are compared bit for bit in the tests.

Rounding is unbiased: a value x between bf16 neighbours lo < |x| < hi (by magnitude) becomes hi with
probability (|x| - lo) / (hi - lo), else lo, so E[round(x)] = x. Values above the largest finite bf16
may round to inf (as round-to-nearest would); NaN stays NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bf16_noise", "stochastic_round_bf16", "reference_stochastic_round_bf16", "rounding_generator"]

_LOW_MASK = -65536  # int32 0xFFFF0000: keeps sign, exponent and the 7 bf16 mantissa bits


def bf16_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform random integers in [0, 2^16), int32, one per element (the bits below the bf16 mantissa)."""
    return torch.randint(0, 1 << 16, tuple(shape), generator=generator, device=device, dtype=torch.int32)


def rounding_generator(generator: torch.Generator, seed: int, index: int, step: int) -> torch.Generator:
    """Reseed `generator` from (seed, parameter index, parameter step): order-independent and resumable."""
    mixed = hash((int(seed), int(index), int(step))) & ((1 << 63) - 1)
    generator.manual_seed(mixed)
    return generator


def stochastic_round_bf16(src: Tensor, noise: Tensor) -> Tensor:
    """Fast path: fp32 `src` (any shape) -> bf16, rounded up in magnitude with probability of the dropped bits.

    `noise`: int32 in [0, 2^16), same shape as `src` (see `bf16_noise`).
    """
    if src.dtype != torch.float32:
        raise TypeError(f"src.dtype is {src.dtype}; stochastic rounding needs fp32 input, pass src.float()")
    bits = src.view(torch.int32) + noise  # [*] carries into the bf16 mantissa with the right probability
    bits.bitwise_and_(_LOW_MASK)
    out = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(src), src.to(torch.bfloat16), out)


def reference_stochastic_round_bf16(src: Tensor, noise: Tensor) -> Tensor:
    """Plain twin of `stochastic_round_bf16`: explicit neighbours and probabilities, float64 arithmetic.

    Rounds up in magnitude iff u + p >= 1 with u = noise / 2^16 and p = (|x| - lo) / (hi - lo), the same
    event as the carry in the fast path. Finite inputs within the bf16 range only.
    """
    x64 = src.double()
    nearest = src.to(torch.bfloat16)
    toward_zero = torch.nextafter(nearest, torch.zeros_like(nearest))
    lo = torch.where(nearest.double().abs() > x64.abs(), toward_zero, nearest)  # truncation toward zero
    away = torch.where(x64 < 0, torch.full_like(lo, float("-inf")), torch.full_like(lo, float("inf")))
    hi = torch.nextafter(lo, away)  # next bf16 away from zero
    lo64, hi64 = lo.double().abs(), hi.double().abs()
    p = (x64.abs() - lo64) / (hi64 - lo64)
    u = noise.double() / 65536.0
    return torch.where(u + p >= 1.0, hi, lo)
