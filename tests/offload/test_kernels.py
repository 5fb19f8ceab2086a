"""numba kernels against the plain-PyTorch code each docstring names."""

import numba
import numpy as np
import pytest
import torch

from offload import kernels
from offload.optim import reference_adamw_rows


def _bf16_bits(t):
    return t.view(torch.int16)


def test_gather_bf16_rounding_matches_torch_on_random_bit_patterns():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096, 64), dtype=torch.int64, generator=gen)
    src = bits.to(torch.int32).view(torch.float32).contiguous()  # every exponent, NaNs, infs, denormals
    ids = torch.randperm(4096, generator=gen)[:999]  # odd: the last row pair is (998, 998)
    out = torch.empty(999, 64, dtype=torch.bfloat16)
    kernels.gather_rows(src.numpy(), ids.numpy(), kernels.as_numpy(out))
    want = src.index_select(0, ids).to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan) and nan.any()
    assert torch.equal(_bf16_bits(out)[~nan], _bf16_bits(want)[~nan])


def test_gather_fp32():
    src = torch.randn(50, 33)
    ids = torch.tensor([49, 0, 7, 7])
    out = torch.empty(6, 33)
    kernels.gather_rows(src.numpy(), ids.numpy(), out.numpy())
    assert torch.equal(out[:4], torch.index_select(src, 0, ids))


@pytest.mark.parametrize("width", [1, 127, 128, 129, 1152, 4100])  # around the block size; narrow + wide rows
@pytest.mark.parametrize("n_ids", [0, 1, 2, 7, 33, 100])  # odd / even / more than one prange task
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_equals_plain_twin(width, n_ids, dtype):
    """Blocked, prefetching, paired-row kernel == the plain-PyTorch twin, bitwise (rows beyond R untouched)."""
    gen = torch.Generator().manual_seed(width * 1000 + n_ids)
    src = torch.randn(150, width, generator=gen) * 1e3
    ids = torch.randint(0, 150, (n_ids,), generator=gen)  # repeats allowed
    out = torch.full((n_ids + 3, width), 7.0, dtype=dtype)
    want = out.clone()
    kernels.gather_rows(src.numpy(), ids.numpy(), kernels.as_numpy(out))
    kernels.reference_gather_rows(src, ids, want)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_gather_rows_threads_agree_with_twin():
    """All cores vs one thread on work above PARALLEL_MIN_BYTES: same bits, == twin."""
    gen = torch.Generator().manual_seed(11)
    src = torch.randn(3000, 1152, generator=gen)
    ids = torch.randperm(3000, generator=gen)[:1001].sort().values
    assert 1001 * 1152 * 6 > kernels.PARALLEL_MIN_BYTES
    outs = []
    for threads in (numba.config.NUMBA_NUM_THREADS, 1):
        kernels.set_num_threads(threads)
        try:
            out = torch.empty(1001, 1152, dtype=torch.bfloat16)
            kernels.gather_rows(src.numpy(), ids.numpy(), kernels.as_numpy(out))
            outs.append(out)
        finally:
            kernels.set_num_threads(None)
    want = kernels.reference_gather_rows(src, ids, torch.empty(1001, 1152, dtype=torch.bfloat16))
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    torch.testing.assert_close(outs[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_accumulate_rows_fresh_and_add_and_maxbits(grad_dtype):
    pending = torch.full((10, 20), 7.0)
    pending[2] = 1.0
    slots = np.array([2, 5, 0], dtype=np.int64)
    fresh = np.array([False, True, True])
    grads = torch.randn(3, 20).to(grad_dtype)
    grads[1, 4] = float("inf")
    want = pending.clone()
    want[2] += grads[0].float()
    want[5] = grads[1].float()
    want[0] = grads[2].float()
    maxbits = np.zeros(10, dtype=np.uint32)
    kernels.accumulate_rows(pending.numpy(), slots, fresh, kernels.as_numpy(grads), maxbits)
    torch.testing.assert_close(pending, want, rtol=0, atol=0)
    got_max = maxbits.view(np.float32)
    assert got_max[2] == want[2].abs().max().item() and got_max[0] == want[0].abs().max().item()
    assert maxbits[5] >= 0x7F800000 and maxbits[1] == 0  # inf flagged; untouched slot untouched


def test_sum_sq_rows():
    pending = torch.randn(9, 31)
    got = kernels.sum_sq_rows(pending.numpy(), 6)
    assert got == pytest.approx(pending[:6].double().square().sum().item(), rel=1e-12)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_adamw_rows_equals_reference_twin(grad_dtype, state_dtype):
    gen = torch.Generator().manual_seed(1)
    n, w = 40, 24
    weights = torch.randn(n, w, generator=gen)
    m = (torch.randn(n, w, generator=gen) * 0.1).to(state_dtype)
    v = torch.rand(n, w, generator=gen).to(state_dtype)
    steps = torch.randint(0, 9, (n,), generator=gen)
    ids = torch.tensor([3, 39, 0, 17, 8])
    grads = torch.randn(7, w, generator=gen).to(grad_dtype)  # buffer may be longer than ids
    ref = [t.clone() for t in (weights, m, v, steps)]
    hp = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.2)
    kernels.adamw_rows(weights.numpy(), kernels.as_numpy(m), kernels.as_numpy(v), steps.numpy(), ids.numpy(),
                       kernels.as_numpy(grads), 0.5, hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"])
    reference_adamw_rows(*ref, ids, grads[:5].float() * 0.5, **hp)
    tol = dict(rtol=1e-5, atol=1e-6)
    moment_tol = dict(rtol=1e-2, atol=1e-6) if state_dtype == torch.bfloat16 else tol
    torch.testing.assert_close(weights, ref[0], **tol)
    torch.testing.assert_close(m, ref[1], **moment_tol)
    torch.testing.assert_close(v, ref[2], **moment_tol)
    assert torch.equal(steps, ref[3])


def test_first_bad_id_and_plan_slots():
    assert kernels.first_bad_id(np.array([0, 4, 9]), 10) == -1
    assert kernels.first_bad_id(np.array([0, 10, -1]), 10) == 1
    n_rows = 10
    slot_of = np.full(n_rows, -1, dtype=np.int64)
    stamp = np.zeros(n_rows, dtype=np.int64)
    pending_ids = np.empty(n_rows, dtype=np.int64)
    slots, fresh = np.empty(4, dtype=np.int64), np.empty(4, dtype=np.bool_)
    n = kernels.plan_slots(np.array([7, 2]), slot_of, stamp, 1, pending_ids, 0, slots, fresh)
    assert n == 2 and list(slots[:2]) == [0, 1] and list(fresh[:2]) == [True, True]
    n = kernels.plan_slots(np.array([2, 5, 7]), slot_of, stamp, 2, pending_ids, n, slots, fresh)
    assert n == 3 and list(slots[:3]) == [1, 2, 0] and list(fresh[:3]) == [False, True, False]
    assert list(pending_ids[:3]) == [7, 2, 5]
    before = slot_of.copy()
    assert kernels.plan_slots(np.array([1, 3, 1]), slot_of, stamp, 3, pending_ids, n, slots, fresh) == -3
    assert np.array_equal(slot_of, before)  # nothing assigned on a duplicate
    kernels.release_slots(pending_ids, n, slot_of)
    assert np.all(slot_of == -1)


def test_parallel_path_equals_single_thread_and_twin():
    """Work above PARALLEL_MIN_BYTES takes the multi-threaded path: same bits as one thread, == twin."""
    gen = torch.Generator().manual_seed(5)
    n, w = 600, 1024
    ids = torch.randperm(n, generator=gen)[:400].sort().values
    grads = torch.randn(400, w, generator=gen)
    assert 400 * w * 28 > kernels.PARALLEL_MIN_BYTES
    base = [torch.randn(n, w, generator=gen), torch.zeros(n, w), torch.zeros(n, w), torch.zeros(n, dtype=torch.int64)]
    results = []
    for threads in (numba.config.NUMBA_NUM_THREADS, 1):  # all cores vs the calling thread alone
        kernels.set_num_threads(threads)
        try:
            st = [t.clone() for t in base]
            for _ in range(2):
                kernels.adamw_rows(*(t.numpy() for t in st), ids.numpy(), grads.numpy(), 1.0, 1e-2, 0.9, 0.999,
                                   1e-8, 0.1)
            out = torch.empty(400, w, dtype=torch.bfloat16)
            kernels.gather_rows(st[0].numpy(), ids.numpy(), kernels.as_numpy(out))
            results.append(st + [out])
        finally:
            kernels.set_num_threads(None)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = [t.clone() for t in base]
    for _ in range(2):
        reference_adamw_rows(*ref, ids, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for a, b in zip(results[0][:4], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][4], results[0][0][ids].to(torch.bfloat16))


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"):
        kernels.set_num_threads(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_abs_bits(dtype):
    grads = torch.randn(6, 17).to(dtype)
    out = np.zeros(8, dtype=np.uint32)
    top = kernels.max_abs_bits(kernels.as_numpy(grads), 5, out)
    want = grads[:5].float().abs().amax(1).view(torch.int32).numpy().view(np.uint32)
    assert np.array_equal(out[:5], want) and top == want.max() and out[5] == 0
    grads[2, 3] = float("-inf")
    assert kernels.max_abs_bits(kernels.as_numpy(grads), 5, out) == 0x7F800000
