"""SparseAdamW: equals torch.optim.AdamW when every row is touched, equals the plain twin when sparse;
accumulation, bf16 gradients / moments, non-finite skip, bad input, state_dict."""

import io

import pytest
import torch

from offload.optim import SparseAdamW, reference_adamw_rows
from offload.store import RowStore

N, W = 80, 48
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _pair(state_dtype=torch.float32, seed=0, **hp):
    """A store + SparseAdamW and a plain copy of the same tensors for the twin."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(N, W, generator=g)
    store = RowStore(N, W, init=init, state_dtype=state_dtype)
    plain = {"weights": init.clone(), "exp_avg": torch.zeros(N, W, dtype=state_dtype),
             "exp_avg_sq": torch.zeros(N, W, dtype=state_dtype), "steps": torch.zeros(N, dtype=torch.int64)}
    return store, SparseAdamW(store, **hp), plain


def _twin(plain, ids, grads, opt):
    reference_adamw_rows(plain["weights"], plain["exp_avg"], plain["exp_avg_sq"], plain["steps"], ids, grads,
                         lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def _assert_store_equals(store, plain, weights_tol=TIGHT, moment_tol=TIGHT):
    torch.testing.assert_close(store.weights, plain["weights"], **weights_tol)
    torch.testing.assert_close(store.exp_avg, plain["exp_avg"], **moment_tol)
    torch.testing.assert_close(store.exp_avg_sq, plain["exp_avg_sq"], **moment_tol)
    assert torch.equal(store.steps, plain["steps"])


def _snapshot(store):
    return [t.clone() for t in (store.weights, store.exp_avg, store.exp_avg_sq, store.steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_all_rows_every_step_equals_torch_adamw(weight_decay):
    store, opt, plain = _pair(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    param = torch.nn.Parameter(plain["weights"].clone())
    ref = torch.optim.AdamW([param], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ids = torch.randperm(N)  # order of ids must not matter
    for _ in range(5):
        grad = torch.randn(N, W)
        param.grad = grad.clone()
        ref.step()
        opt.accumulate(ids, grad[ids])
        assert opt.step() is True
    st = ref.state[param]
    torch.testing.assert_close(store.weights, param.detach(), **TIGHT)
    torch.testing.assert_close(store.exp_avg, st["exp_avg"], **TIGHT)
    torch.testing.assert_close(store.exp_avg_sq, st["exp_avg_sq"], **TIGHT)
    assert torch.all(store.steps == 5)
    assert not torch.equal(store.weights, plain["weights"])  # it did train


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_partial_touches_many_steps_equal_twin(state_dtype):
    store, opt, plain = _pair(state_dtype, lr=1e-2, weight_decay=0.05)
    untouched = torch.arange(N - 8, N)  # never touched: must stay exactly as initialised
    init_untouched = store.weights[untouched].clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        opt.lr = 1e-2 * (0.9**step)  # a schedule drives lr between steps
        ids = torch.randperm(N - 8, generator=gen)[: int(torch.randint(1, N - 8, (1,), generator=gen))]
        grads = torch.randn(len(ids), W, generator=gen) * (step + 1)
        opt.accumulate(ids, grads)
        opt.step()
        _twin(plain, ids, grads, opt)
    bf16 = state_dtype == torch.bfloat16
    moment_tol = dict(rtol=1e-2, atol=1e-5) if bf16 else TIGHT  # one bf16 ulp where fp32 ulps round apart
    _assert_store_equals(store, plain, dict(rtol=1e-5, atol=1e-4) if bf16 else TIGHT, moment_tol)
    assert torch.equal(store.weights[untouched], init_untouched)
    assert torch.all(store.steps[untouched] == 0) and torch.all(store.exp_avg[untouched] == 0)
    assert store.steps.max() > 10 and store.steps[: N - 8].min() < store.steps.max()  # really lazy


def test_bf16_grads_equal_twin_fed_same_bf16_values():
    store, opt, plain = _pair(lr=1e-2, weight_decay=0.01)
    for _ in range(4):
        ids = torch.randperm(N)[:30]
        grads = torch.randn(30, W).to(torch.bfloat16)
        opt.accumulate(ids, grads)
        opt.step()
        _twin(plain, ids, grads.float(), opt)
    _assert_store_equals(store, plain)


def test_k_accumulates_equal_one_summed_call():
    store_a, opt_a, _ = _pair(lr=1e-2)
    store_b, opt_b, _ = _pair(lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    total = torch.zeros(N, W)
    touched = torch.zeros(N, dtype=torch.bool)
    for k in range(4):  # overlapping id sets, different orders, both wire dtypes
        ids = torch.randperm(N, generator=gen)[:50]
        grads = torch.randn(50, W, generator=gen)
        grads = grads.to(torch.bfloat16) if k % 2 else grads
        opt_a.accumulate(ids, grads)
        total.index_add_(0, ids, grads.float())
        touched[ids] = True
    ids_all = touched.nonzero().squeeze(1)
    assert opt_a.pending_rows == len(ids_all)
    torch.testing.assert_close(opt_a.grad_sq_norm(), total.double().square().sum().item(), rtol=1e-6, atol=0)
    opt_b.accumulate(ids_all, total[ids_all])
    opt_a.step()
    opt_b.step()
    for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
        torch.testing.assert_close(getattr(store_a, key), getattr(store_b, key), **TIGHT)
    assert opt_a.pending_rows == 0


def test_grad_scale_equals_scaled_grads():
    store, opt, plain = _pair(lr=1e-2)
    ids, grads = torch.arange(0, N, 3), torch.randn(len(range(0, N, 3)), W)
    opt.accumulate(ids, grads)
    opt.step(grad_scale=0.25)
    _twin(plain, ids, grads * 0.25, opt)
    _assert_store_equals(store, plain)


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow_after_scale", "nan_scale"])
def test_non_finite_skips_whole_step_and_counts(bad):
    store, opt, plain = _pair(lr=1e-2)
    opt.accumulate(torch.arange(10), torch.randn(10, W))
    grads = torch.randn(5, W)
    scale = 1.0
    if bad in ("nan", "inf"):
        grads[3, 7] = float(bad)
    elif bad == "overflow_after_scale":
        grads[0, 0], scale = 3e38, 10.0
    else:
        scale = float("nan")
    opt.accumulate(torch.arange(20, 25), grads)
    before = _snapshot(store)
    with pytest.warns(UserWarning, match="non-finite"):
        assert opt.step(grad_scale=scale) is False
    assert opt.skipped_steps == 1 and opt.pending_rows == 0
    for a, b in zip(before, _snapshot(store)):
        assert torch.equal(a, b)
    opt.accumulate(torch.arange(5), torch.full((5, W), float("inf")))
    assert opt.step() is False and opt.skipped_steps == 2  # warned once only (no second warning needed)
    ids, g = torch.arange(4), torch.randn(4, W)
    opt.accumulate(ids, g)
    assert opt.step() is True
    _twin(plain, ids, g, opt)
    _assert_store_equals(store, plain)


def _bad_inputs():
    return [
        (torch.tensor([1, 2], dtype=torch.int32), torch.randn(2, W), TypeError, "torch.int64"),
        (torch.tensor([[1, 2]]), torch.randn(2, W), ValueError, "rank 1"),
        (torch.tensor([1, N]), torch.randn(2, W), ValueError, f"ids[1] = {N}"),
        (torch.tensor([-3, 1]), torch.randn(2, W), ValueError, "ids[0] = -3"),
        (torch.tensor([4, 7, 4]), torch.randn(3, W), ValueError, "ids[0] == ids[2] == 4"),
        (torch.tensor([1, 2]), torch.randn(3, W), ValueError, "expected (2, 48)"),
        (torch.tensor([1, 2]), torch.randn(2, W + 1), ValueError, "expected (2, 48)"),
        (torch.tensor([1, 2]), torch.randn(2, W, dtype=torch.float64), TypeError, "float32 or bfloat16"),
        (torch.tensor([1, 2]), torch.randn(2, W, dtype=torch.float16), TypeError, "float32 or bfloat16"),
        (torch.tensor([1, 2]), [[0.0] * W] * 2, TypeError, "torch.Tensor"),
    ]


@pytest.mark.parametrize("ids, grads, err, word", _bad_inputs())
def test_bad_input_raises_and_changes_nothing(ids, grads, err, word):
    store, opt, plain = _pair(lr=1e-2)
    good_ids, good = torch.tensor([4, 9]), torch.randn(2, W)
    opt.accumulate(good_ids, good)
    before = _snapshot(store)
    with pytest.raises(err) as e:
        opt.accumulate(ids, grads)
    assert word in str(e.value), str(e.value)
    for a, b in zip(before, _snapshot(store)):
        assert torch.equal(a, b)
    assert opt.pending_rows == 2
    opt.step()  # only the good gradients are applied
    _twin(plain, good_ids, good, opt)
    _assert_store_equals(store, plain)
    opt.accumulate(torch.tensor([4, 7]), torch.randn(2, W))  # a duplicate in a failed call leaves no trace


def test_zero_grad_drops_pending():
    store, opt, _ = _pair()
    opt.accumulate(torch.arange(10), torch.randn(10, W))
    before = _snapshot(store)
    opt.zero_grad()
    assert opt.grad_sq_norm() == 0.0 and opt.step() is True
    for a, b in zip(before, _snapshot(store)):
        assert torch.equal(a, b)


def test_pending_buffer_grows_then_stays():
    big = 1000
    store = RowStore(big, 16)
    opt = SparseAdamW(store)
    for ids in (torch.arange(30), torch.arange(30, 200), torch.arange(200, 900)):  # grows geometrically
        opt.accumulate(ids, torch.randn(len(ids), 16))
    opt.step()
    ptr = opt._pending.data_ptr()
    for _ in range(5):
        opt.accumulate(torch.randperm(big)[:900], torch.randn(900, 16))
        opt.step()
        assert opt._pending.data_ptr() == ptr  # no allocation per step after warm-up


def test_state_dict_round_trip_then_identical_training():
    store_a, opt_a, _ = _pair(state_dtype=torch.bfloat16, lr=2e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randperm(N, generator=gen)[:40], torch.randn(40, W, generator=gen)) for _ in range(6)]
    for ids, g in batches[:3]:
        opt_a.accumulate(ids, g)
        opt_a.step()
    opt_a.lr = 5e-3
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    store_b = RowStore(N, W, state_dtype=torch.bfloat16)
    opt_b = SparseAdamW(store_b)
    opt_b.load_state_dict(torch.load(buf))
    assert (opt_b.lr, opt_b.betas, opt_b.weight_decay) == (5e-3, (0.9, 0.999), 0.1)
    for ids, g in batches[3:]:
        for opt in (opt_a, opt_b):
            opt.accumulate(ids, g)
            opt.step()
    for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(getattr(store_a, key), getattr(store_b, key)), key


@pytest.mark.parametrize("hp", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1.0),
                                dict(weight_decay=-0.1)])
def test_bad_hyper_parameters(hp):
    with pytest.raises(ValueError):
        SparseAdamW(RowStore(4, 4), **hp)


def test_lr_set_to_nonsense_is_caught_at_step():
    store, opt, _ = _pair()
    opt.accumulate(torch.arange(3), torch.randn(3, W))
    opt.lr = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_step_rows_equals_accumulate_then_step(grad_dtype):
    store_a, opt_a, _ = _pair(lr=1e-2, weight_decay=0.1)
    store_b, opt_b, _ = _pair(lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        ids = torch.randperm(N, generator=gen)[:33]
        grads = torch.randn(33, W, generator=gen).to(grad_dtype)
        opt_a.accumulate(ids, grads)
        assert opt_a.step(grad_scale=0.5) is True
        assert opt_b.step_rows(ids, grads, grad_scale=0.5) is True
    for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(getattr(store_a, key), getattr(store_b, key)), key


def test_step_rows_checks_and_skips():
    store, opt, _ = _pair(lr=1e-2)
    before = _snapshot(store)
    with pytest.raises(ValueError, match="duplicate"):
        opt.step_rows(torch.tensor([3, 5, 3]), torch.randn(3, W))
    grads = torch.randn(2, W)
    grads[1, 2] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        assert opt.step_rows(torch.tensor([3, 5]), grads) is False
    assert opt.skipped_steps == 1
    for a, b in zip(before, _snapshot(store)):
        assert torch.equal(a, b)
    opt.accumulate(torch.tensor([1]), torch.randn(1, W))
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step_rows(torch.tensor([3]), torch.randn(1, W))
    assert opt.step() is True and opt.step_rows(torch.tensor([3, 5]), torch.randn(2, W)) is True


def test_empty_ids_are_a_no_op():
    store, opt, _ = _pair()
    before = _snapshot(store)
    empty = torch.empty(0, dtype=torch.int64)
    opt.accumulate(empty, torch.empty(0, W))
    assert opt.pending_rows == 0 and opt.step() is True
    assert opt.step_rows(empty, torch.empty(0, W, dtype=torch.bfloat16)) is True
    assert store.gather(empty, torch.empty(0, W)).shape == (0, W)
    for a, b in zip(before, _snapshot(store)):
        assert torch.equal(a, b)
