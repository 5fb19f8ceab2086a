"""The key generator (`meft.adapter.keys`): bitwise equal to its plain twin on every path and device."""

import numpy as np
import pytest
import torch

from meft.adapter.keys import _torch_keys, generate_keys, key_table, layer_base, reference_keys

IDS = [0, 1, 5, 255, -1, 4095, 123_456, 2**31 - 1]


def _bits(t) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return a.view(np.int32)


@pytest.mark.parametrize("d", [1, 8, 576, 4096])
@pytest.mark.parametrize("seed,layer", [(0, 0), (7, 3), (2**40 + 5, 31)])
def test_cpu_kernel_and_torch_ops_equal_the_plain_reference_bitwise(d, seed, layer):
    ids = torch.tensor(IDS)
    ref = reference_keys(IDS, seed=seed, layer=layer, d=d)  # [R, d] fp32
    assert (_bits(ref) == _bits(generate_keys(ids, seed=seed, layer=layer, d=d))).all()
    assert (_bits(ref) == _bits(_torch_keys(ids, seed=seed, layer=layer, d=d))).all()
    bound = np.float32(d ** -0.5)
    assert np.isfinite(ref).all() and (np.abs(ref) < bound).all()
    assert (_bits(ref[IDS.index(-1)]) == _bits(ref[0])).all()  # -1: row 0's keys


def test_distribution_is_uniform_and_streams_differ():
    d = 64
    k = key_table(4096, seed=0, layer=0, d=d).numpy()  # [N, d]
    bound = d ** -0.5
    assert abs(k.mean()) < 0.01 * bound
    assert abs(k.std() - bound / 3 ** 0.5) < 0.01 * bound  # U(-b, b): std b / sqrt(3)
    hist = np.histogram(k, bins=16, range=(-bound, bound))[0] / k.size
    assert np.abs(hist - 1 / 16).max() < 0.005
    assert abs(np.corrcoef(k[:, 0], k[:, 1])[0, 1]) < 0.05 and abs(np.corrcoef(k[:-1, 0], k[1:, 0])[0, 1]) < 0.05
    other = key_table(16, seed=0, layer=1, d=d).numpy()
    assert not np.array_equal(other, k[:16]) and not np.array_equal(key_table(16, seed=1, layer=0, d=d), k[:16])
    assert layer_base(0, 0) != layer_base(0, 1) != layer_base(1, 0)


def test_dtype_and_wire_rounding_are_the_casts_of_the_fp32_keys():
    ids = torch.arange(4096)
    fp32 = generate_keys(ids, seed=3, layer=2, d=24)
    assert torch.equal(generate_keys(ids, seed=3, layer=2, d=24, dtype=torch.bfloat16), fp32.bfloat16())
    # rounded to a bf16 wire inside the kernel, still fp32: as a stored key's trip fp32 -> bf16 -> fp32
    via_wire = generate_keys(ids, seed=3, layer=2, d=24, wire=torch.bfloat16)
    assert via_wire.dtype == torch.float32 and torch.equal(via_wire, fp32.bfloat16().float())
    assert torch.equal(generate_keys(ids, seed=3, layer=2, d=24, dtype=torch.bfloat16, wire=torch.bfloat16),
                       fp32.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_bitwise():
    ids = torch.tensor(IDS)
    for d in (8, 576, 4096):
        cpu = generate_keys(ids, seed=11, layer=5, d=d)
        cuda = generate_keys(ids.cuda(), seed=11, layer=5, d=d).cpu()
        assert (_bits(cpu) == _bits(cuda)).all()
        wire = dict(seed=11, layer=5, d=d, wire=torch.bfloat16)
        assert torch.equal(generate_keys(ids, **wire), generate_keys(ids.cuda(), **wire).cpu())
