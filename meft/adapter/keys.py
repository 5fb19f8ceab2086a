"""Frozen adapter keys generated where they are used, from (seed, layer, row): never stored, never moved.

Owns the counter-based key generator behind `MeftConfig.key_source = "generated"`. With frozen keys
(`key_lr=0`) a row's key is a pure function of (seed, layer, row, column), so the host store holds values
and their AdamW moments only, only value rows cross to the device and only value gradients come back
(half the bytes and half the host update of a [K | V] row). The device computes the keys of a fetch's
row ids itself; the CPU's per-token inference path generates a layer's whole key table once and caches it.

The generator is integer arithmetic that gives bitwise the same numbers on every device:

    base   = mix(mix((seed * A + layer * B) mod 2^32))                   (Python ints, once per layer)
    rowkey = mix((base + row) mod 2^32)                                  [R]
    u32    = mix(rowkey XOR (col * G mod 2^32))                          [R, d]
    key    = (2 * (u32 >> 8) + 1 - 2^24) * (fp32(d ** -0.5) * 2^-24)     fp32, in (-d^-0.5, d^-0.5)

`mix` is three xorshift rounds and two multiplies by odd constants below 2^31, on values below 2^32 held
in int64 and masked with `& 0xFFFFFFFF` after each multiply: no product reaches 2^63, so nothing overflows
a signed 64-bit integer (torch) and nothing depends on wrap-around. The top 24 bits give an integer
m in [0, 2^24); (2m + 1 - 2^24) is exact in fp32 and the one multiply by a power-of-two-scaled fp32 bound
rounds once, IEEE round-to-nearest on every device: the same U(-1/sqrt(d), 1/sqrt(d)) distribution as
the stored path's `row_init` (torch's RNG), on a grid of 2^24 midpoints.

Three implementations, tested bitwise equal (`tests/meft/adapter/test_keys.py`): `reference_keys` (plain
numpy uint64), `_torch_keys` (torch integer ops, any device: what a GPU runs) and a numba kernel (the CPU:
one pass instead of ~20 tensor-sized temporaries). `generate_keys` picks the device's one. Ids of -1
(unused routing slots) give the keys of row 0: finite, and their gate weight is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

__all__ = ["GENERATOR", "KeyedRows", "generate_keys", "key_table", "reference_keys", "layer_base"]

GENERATOR = "mix32-v1"  # saved with adapters: the name of this exact function of (seed, layer, row, column)
_M = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x6C8E9CF5  # odd multipliers < 2^31: x * c < 2^63 for x < 2^32
_A, _B, _G = 0x2545F491, 0x5851F42D, 0x1E3779B9  # seed, layer and column strides (< 2^31)


class KeyedRows(NamedTuple):
    """A fetch's rows with generated keys: `keys` [R, d] (no gradient) and `values` [R, d] (the leaf whose
    gradient goes back to the host). Stands where a stored-keys path passes `rows` [R, 2d]."""
    keys: Tensor
    values: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device


def _mix_int(x: int) -> int:
    """`mix` on a Python int (per-layer constants)."""
    x &= _M
    x ^= x >> 16
    x = (x * _C1) & _M
    x ^= x >> 15
    x = (x * _C2) & _M
    return x ^ (x >> 16)


def layer_base(seed: int, layer: int) -> int:
    """The layer's 32-bit key stream id from (seed, layer)."""
    if seed < 0 or layer < 0:
        raise ValueError(f"seed and layer must be >= 0, got seed={seed}, layer={layer}")
    return _mix_int(_mix_int(seed * _A + layer * _B))


def _scale(d: int) -> np.float32:
    """fp32(d ** -0.5) * 2^-24, exact (a power-of-two scaling)."""
    return np.float32(np.float32(d ** -0.5) * np.float32(2.0 ** -24))


def reference_keys(ids, *, seed: int, layer: int, d: int) -> np.ndarray:
    """Plain numpy twin: keys [R, d] fp32 of row ids (any int sequence; -1 reads row 0)."""
    rows = np.maximum(np.asarray(ids, dtype=np.int64), 0).astype(np.uint64)
    m = np.uint64(_M)

    def mix(x):
        x = x & m
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(_C1)) & m
        x = x ^ (x >> np.uint64(15))
        x = (x * np.uint64(_C2)) & m
        return x ^ (x >> np.uint64(16))

    rowkey = mix(np.uint64(layer_base(seed, layer)) + rows)  # [R]
    cols = (np.arange(d, dtype=np.uint64) * np.uint64(_G)) & m  # [d]
    u = mix(rowkey[:, None] ^ cols[None, :])  # [R, d]
    signed = (2 * (u >> np.uint64(8)).astype(np.int64) + 1 - (1 << 24)).astype(np.float32)
    return signed * _scale(d)


def _torch_mix(x: Tensor) -> Tensor:
    """`mix` in place on an int64 tensor of values < 2^32."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_C1).bitwise_and_(_M)
    x.bitwise_xor_(x >> 15)
    x.mul_(_C2).bitwise_and_(_M)
    return x.bitwise_xor_(x >> 16)


def _torch_keys(ids: Tensor, *, seed: int, layer: int, d: int) -> Tensor:
    """Torch integer ops on ids' device (no host sync): keys [R, d] fp32."""
    rowkey = _torch_mix((ids.clamp(min=0) + layer_base(seed, layer)).bitwise_and_(_M))  # [R] int64
    cols = torch.arange(d, dtype=torch.int64, device=ids.device).mul_(_G).bitwise_and_(_M)  # [d]
    u = _torch_mix(rowkey[:, None] ^ cols[None, :])  # [R, d] int64 < 2^32
    signed = (u >> 8).mul_(2).add_(1 - (1 << 24)).to(torch.float32)  # exact: |value| < 2^24
    return signed.mul_(float(_scale(d)))


@njit(cache=True, inline="always")
def _mix_nb(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x6C8E9CF5) & 0xFFFFFFFF
    return x ^ (x >> 16)


@njit(parallel=True, cache=True, nogil=True)
def _keys_kernel(ids, base, scale, round_bf16, out, out_bits):
    """out [R, d] fp32 keys; round_bf16: rounded to bf16 (round-to-nearest-even on the bits, out_bits is
    out's uint32 view), still fp32: what `.to(torch.bfloat16).float()` gives, in the same pass."""
    n, d = out.shape
    for i in prange(n):
        r = ids[i] if ids[i] > 0 else 0
        rowkey = _mix_nb((r + base) & 0xFFFFFFFF)
        for j in range(d):
            u = _mix_nb(rowkey ^ ((j * 0x1E3779B9) & 0xFFFFFFFF))
            out[i, j] = np.float32(2 * (u >> 8) + 1 - (1 << 24)) * scale
            if round_bf16:  # |key| < 1: no carry reaches the sign bit
                bits = np.int64(out_bits[i, j])
                out_bits[i, j] = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000


def generate_keys(ids: Tensor, *, seed: int, layer: int, d: int, dtype: torch.dtype = torch.float32,
                  wire: torch.dtype = torch.float32) -> Tensor:
    """Keys [R, d] of row ids [R] (int64, -1: row 0's keys) on ids' device, generated in fp32, rounded to
    `wire` and given in `dtype` (`.to(wire).to(dtype)`: the rounding a stored key gets on its way)."""
    if ids.device.type == "cpu":  # made in numpy and wrapped: no tensor ops but the ids' numpy view
        arr = np.empty((ids.shape[0], d), dtype=np.float32)  # [R, d]
        _keys_kernel(ids.contiguous().numpy(), np.int64(layer_base(seed, layer)), _scale(d),
                     wire == torch.bfloat16, arr, arr.view(np.uint32))
        out = torch.from_numpy(arr)
        return out if dtype == torch.float32 else out.to(dtype)
    out = _torch_keys(ids, seed=seed, layer=layer, d=d)
    return out.to(wire).to(dtype)


def key_table(n_rows: int, *, seed: int, layer: int, d: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
    """Every key of a layer, [n_rows, d] `dtype` on `device` (router init, per-token inference tables)."""
    ids = torch.arange(n_rows, dtype=torch.int64, device=device)
    return generate_keys(ids, seed=seed, layer=layer, d=d, dtype=dtype, wire=dtype)
