"""RowStore: allocation, host-RAM refusal, gather (fp32 / bf16) against index_select, state_dict."""

import io

import pytest
import torch

from offload.store import RowStore

N, W = 96, 40


def _store(state_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RowStore(N, W, init=torch.randn(N, W, generator=g), state_dtype=state_dtype)


def _bits(t):
    return t.view(torch.int16)


def test_layout_and_init_variants():
    s = RowStore(N, W)
    assert (s.n_rows, s.width, s.state_dtype) == (N, W, torch.float32)
    assert s.weights.shape == s.exp_avg.shape == s.exp_avg_sq.shape == (N, W)
    assert s.steps.shape == (N,) and s.steps.dtype == torch.int64
    assert torch.count_nonzero(s.weights) == 0 and torch.count_nonzero(s.steps) == 0
    assert s.nbytes == RowStore.bytes_needed(N, W) == N * (W * 12 + 8)
    assert RowStore.bytes_needed(N, W, torch.bfloat16) == N * (W * 8 + 8)
    init = torch.randn(N, W)
    torch.testing.assert_close(RowStore(N, W, init=init).weights, init, rtol=0, atol=0)
    s = RowStore(N, W, init=lambda w: w.fill_(0.5))
    assert torch.all(s.weights == 0.5)
    sb = RowStore(N, W, state_dtype=torch.bfloat16)
    assert sb.exp_avg.dtype == sb.exp_avg_sq.dtype == torch.bfloat16 and sb.weights.dtype == torch.float32


def test_store_memory_is_never_pinned():
    """No copy reads the fp32 master rows or the moments: pinning them would only lock host RAM (rounded
    up to a power of two by the caching host allocator). Staging slots are what the engine pins."""
    s = RowStore(N, W)
    assert not any(t.is_pinned() for t in (s.weights, s.exp_avg, s.exp_avg_sq, s.steps))


@pytest.mark.parametrize("kwargs, err", [
    (dict(n_rows=0, width=W), ValueError),
    (dict(n_rows=N, width=-1), ValueError),
    (dict(n_rows=N, width=W, state_dtype=torch.float16), TypeError),
    (dict(n_rows=N, width=W, init="ones"), ValueError),
    (dict(n_rows=N, width=W, init=torch.zeros(N, W + 1)), ValueError),
])
def test_bad_constructor_args(kwargs, err):
    with pytest.raises(err):
        RowStore(**kwargs)


def test_refuses_more_than_host_ram_with_numbers_and_options():
    with pytest.raises(MemoryError) as e:
        RowStore(10**12, 8192)
    msg = str(e.value)
    need = RowStore.bytes_needed(10**12, 8192)
    assert str(need) in msg and "available" in msg
    assert "state_dtype=torch.bfloat16" in msg and "rows at width 8192" in msg


def test_gather_fp32_equals_index_select():
    s = _store()
    ids = torch.tensor([5, 0, 95, 5, 17], dtype=torch.int64)
    out = torch.full((8, W), -1.0)
    got = s.gather(ids, out)
    assert got.shape == (5, W) and got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.index_select(s.weights, 0, ids), rtol=0, atol=0)
    assert torch.all(out[5:] == -1.0)


def test_gather_bf16_bit_exact_incl_rounding_ties_and_specials():
    s = _store()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -1e-40, 3.4e38])
    tie_bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF]  # ties to even (down, up), near-tie, max
    ties = torch.tensor(tie_bits, dtype=torch.int32).view(torch.float32)
    row = torch.cat([special, ties, torch.randn(W - special.numel() - ties.numel())])
    s.weights[3] = row
    ids = torch.tensor([3, 1, 3, 60])
    out = torch.empty(4, W, dtype=torch.bfloat16)
    got = s.gather(ids, out)
    want = torch.index_select(s.weights, 0, ids).to(torch.bfloat16)
    assert torch.isnan(got[0, 0]) and torch.isnan(got[2, 0])
    assert torch.equal(_bits(got)[:, 1:], _bits(want)[:, 1:])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("ids, out, err, word", [
    (torch.tensor([1, 2], dtype=torch.int32), torch.empty(2, W), TypeError, "int64"),
    (torch.tensor([[1, 2]]), torch.empty(2, W), ValueError, "rank 1"),
    (torch.tensor([1, N]), torch.empty(2, W), ValueError, f"ids[1] = {N}"),
    (torch.tensor([-1]), torch.empty(2, W), ValueError, "ids[0] = -1"),
    (torch.tensor([1, 2]), torch.empty(2, W, dtype=torch.float16), TypeError, "float32 or bfloat16"),
    (torch.tensor([1, 2]), torch.empty(1, W), ValueError, "out has shape"),
    (torch.tensor([1, 2]), torch.empty(2, W + 1), ValueError, "out has shape"),
    (torch.tensor([1, 2]), torch.empty(W, 2).t(), ValueError, "contiguous"),
    ([1, 2], torch.empty(2, W), TypeError, "torch.Tensor"),
])
def test_gather_bad_input(ids, out, err, word):
    s = _store()
    with pytest.raises(err, match=None) as e:
        s.gather(ids, out)
    assert word in str(e.value)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_including_steps(state_dtype):
    a = _store(state_dtype, seed=1)
    a.exp_avg.normal_()
    a.exp_avg_sq.uniform_()
    a.steps.random_(0, 50)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = RowStore(N, W, state_dtype=state_dtype)
    b.load_state_dict(torch.load(buf))
    for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    out_a, out_b = torch.empty(3, W), torch.empty(3, W)
    ids = torch.tensor([0, 50, 95])
    assert torch.equal(a.gather(ids, out_a), b.gather(ids, out_b))  # numpy views still bound after load


def test_load_state_dict_rejects_mismatch():
    a = _store()
    with pytest.raises(ValueError, match="rows, width"):
        RowStore(N + 1, W).load_state_dict(a.state_dict())
    sd = dict(a.state_dict(), steps=torch.zeros(N, dtype=torch.int32))
    with pytest.raises(ValueError, match="steps"):
        RowStore(N, W).load_state_dict(sd)
    with pytest.raises(ValueError, match="exp_avg"):
        RowStore(N, W).load_state_dict({k: v for k, v in a.state_dict().items() if k != "exp_avg"})
