"""Sparse update (MeftConfig.sparse_update) in offload: a per-row mask that travels with the pushed row
gradients. Masked rows keep their weights, moments and step counts bit for bit (no zero-gradient AdamW
step); the fused kernel equals its plain twin; TransferScheduler (fused, accumulate, step union, clipping)
equals ResidentScheduler; an all-True mask is bitwise the same as no mask."""

import pytest
import torch

from offload.optim import SparseAdamW, reference_adamw_rows
from offload.resident import ResidentScheduler
from offload.scheduler import TransferScheduler
from offload.store import RowStore

N, W = 64, 16


pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def _init(seed=0):
    return torch.randn(N, W, generator=torch.Generator().manual_seed(seed))


def _state(store):
    return [t.clone() for t in (store.weights, store.exp_avg, store.exp_avg_sq, store.steps)]


def _warm(opt):
    """Two full steps so every row has non-zero moments (a zero-gradient step would then still move it)."""
    for k in range(2):
        opt.step_rows(torch.arange(N), torch.randn(N, W, generator=torch.Generator().manual_seed(10 + k)))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kernel_skips_masked_rows_and_equals_plain_twin(state_dtype):
    store = RowStore(N, W, init=_init(), state_dtype=state_dtype)
    opt = SparseAdamW(store, lr=1e-2, weight_decay=0.1)
    _warm(opt)
    plain = dict(zip(("weights", "exp_avg", "exp_avg_sq", "steps"), _state(store)))
    before = _state(store)
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(N, generator=g)[:40]
    grads = torch.randn(40, W, generator=g)
    keep = torch.rand(40, generator=g) < 0.4
    assert opt.step_rows(ids, grads, keep=keep)
    reference_adamw_rows(plain["weights"], plain["exp_avg"], plain["exp_avg_sq"], plain["steps"], ids, grads,
                         lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, keep=keep)
    after = _state(store)
    for a, p in zip(after, plain.values()):  # kernel == plain twin
        torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-7)
    masked, kept = ids[~keep], ids[keep]
    for b, a in zip(before, after):  # masked rows: bit for bit unchanged, moments and step count included
        assert torch.equal(a[masked], b[masked])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids] = False
    for b, a in zip(before, after):
        assert torch.equal(a[untouched], b[untouched])
    assert torch.equal(after[3][kept], before[3][kept] + 1)  # kept rows took a step
    assert not torch.equal(after[0][kept], before[0][kept])


def test_masked_row_gradient_is_ignored_even_non_finite():
    store = RowStore(N, W, init=_init())
    opt = SparseAdamW(store, lr=1e-2)
    grads = torch.randn(4, W)
    grads[1, 0] = float("nan")
    keep = torch.tensor([True, False, True, True])
    assert opt.step_rows(torch.arange(4), grads, keep=keep) and opt.skipped_steps == 0
    assert store.steps[:4].tolist() == [1, 0, 1, 1]
    opt.accumulate(torch.arange(4), grads, keep)
    assert opt.pending_rows == 3 and opt.step()


def test_accumulate_with_mask_equals_step_rows_with_mask():
    a, b = (SparseAdamW(RowStore(N, W, init=_init()), lr=1e-2) for _ in range(2))
    for opt in (a, b):
        _warm(opt)
    ids, grads = torch.arange(0, N, 2), torch.randn(N // 2, W)
    keep = torch.arange(N // 2) % 3 == 0
    a.step_rows(ids, grads, keep=keep)
    b.accumulate(ids, grads, keep)
    b.step()
    for x, y in zip(_state(a.store), _state(b.store)):
        assert torch.equal(x, y)


def _opts(seed=0, n_layers=2):
    return [SparseAdamW(RowStore(N, W, init=_init(seed + la)), lr=1e-2) for la in range(n_layers)]


def _script(n_steps, seed, accum_max=2):
    """[(accum, [micro-batch: [(layer, ids [R] with -1 padding, keep [R] | None)]])]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        accum = int(torch.randint(1, accum_max + 1, (1,), generator=g))
        mbs = []
        for _ in range(accum):
            parts = []
            for la in range(2):
                n = int(torch.randint(1, 13, (1,), generator=g))
                ids = torch.cat([torch.randperm(N, generator=g)[:n].sort().values,
                                 torch.full((16 - n,), -1, dtype=torch.int64)])  # fixed shape, -1 padding
                parts.append((la, ids, torch.rand(16, generator=g) < 0.5))
            mbs.append(parts)
        out.append((accum, mbs))
    return out


def _run(s, script, masked=True):
    for step, (accum, mbs) in enumerate(script):
        s.begin_step(accum)
        for m, parts in enumerate(mbs):
            if m:
                s.begin_micro_batch()
            for la, ids, keep in parts:
                rows = s.fetch(la, ids).wait()
                grads = rows.float() * 0.5 + (step + 1) * 0.01 * (la + 1)  # [16, W]; padding rows: anything
                s.push_grads(la, ids, grads, **({"keep": keep} if masked else {}))
        s.finish_step()
    s.flush()


@pytest.mark.parametrize("clip,staleness", [("none", 0), ("layer", 0), ("global", 1)])
def test_transfer_scheduler_equals_resident_twin_with_masks(clip, staleness):
    script = _script(6, seed=int(clip == "layer"))
    stores = []
    for cls in (TransferScheduler, ResidentScheduler):
        opts = _opts()
        kw = dict(max_rows=16, wire_dtype=torch.float32, clip=clip, max_norm=0.5, staleness=staleness,
                  update_mask=True)
        if cls is TransferScheduler:
            kw["host_threads"] = 1
        with cls(opts, **kw) as s:
            _run(s, script)
        stores.append([_state(o.store) for o in opts])
    for layer_t, layer_r in zip(*stores):
        for a, b in zip(layer_t, layer_r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # rows that no micro-batch ever kept were never updated
    never = torch.ones(N, dtype=torch.bool)
    for _, mbs in script:
        for parts in mbs:
            for la, ids, keep in parts:
                if la == 0:
                    never[ids[(ids >= 0) & keep]] = False
    assert never.any() and torch.all(stores[0][0][3][never] == 0)


@pytest.mark.parametrize("accum_max", [1, 2])
def test_all_true_mask_is_bitwise_no_mask(accum_max):
    """update_mask=True with every row kept == update_mask=False without masks (the sparse_update=0 path)."""
    script = _script(5, seed=7, accum_max=accum_max)
    script = [(a, [[(la, ids, torch.ones_like(keep)) for la, ids, keep in p] for p in mbs]) for a, mbs in script]
    results = []
    for masked in (True, False):
        opts = _opts()
        with TransferScheduler(opts, max_rows=16, host_threads=1, update_mask=masked) as s:
            _run(s, script, masked=masked)
        results.append([_state(o.store) for o in opts])
    for layer_a, layer_b in zip(*results):
        for a, b in zip(layer_a, layer_b):
            assert torch.equal(a, b)


def test_meter_counts_rows_updated_and_mask_needs_update_mask():
    opts = _opts(n_layers=1)
    ids = torch.arange(16)
    keep = torch.arange(16) < 5
    with TransferScheduler(opts, max_rows=16, host_threads=1, update_mask=True) as s:
        s.begin_step()
        s.fetch(0, ids).wait()
        s.push_grads(0, ids, torch.ones(16, W), keep=keep)
        s.finish_step()
        assert s.meter.report()["cpu"]["update"]["rows"] == 5
        with pytest.raises(TypeError, match="bool tensor"):
            s.begin_step()
            s.fetch(0, ids).wait()
            s.push_grads(0, ids, torch.ones(16, W), keep=keep.int())
    with TransferScheduler(_opts(n_layers=1), max_rows=16, host_threads=1) as s:
        s.begin_step()
        s.fetch(0, ids).wait()
        with pytest.raises(ValueError, match="update_mask=True"):
            s.push_grads(0, ids, torch.ones(16, W), keep=keep)
        s.push_grads(0, ids, torch.ones(16, W))
        s.finish_step()


def test_staging_bytes_counts_the_mask_slots():
    opts = [SparseAdamW(RowStore(128, 16), lr=1e-2) for _ in range(3)]
    with TransferScheduler(opts, max_rows=32, n_slots=3, wire_dtype=torch.bfloat16, update_mask=True) as s:
        real = s.h2d_pool.nbytes + s.d2h_pool.nbytes + sum(st.ids_host.nbytes + st.slots_host.nbytes for st in s.layers)
        assert real == TransferScheduler.staging_bytes(3, 32, 16, torch.bfloat16, n_slots=3, update_mask=True)
