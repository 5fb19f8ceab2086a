"""Both schedulers implement `offload.protocol.RowScheduler` in full, and the resident twin's prefetch +
`fetch_more` + partial push equals TransferScheduler's, bitwise, on the CPU (staleness 0 and 1)."""

import inspect

import pytest
import torch

import offload
from offload import resident
from offload.protocol import RowHandle, RowScheduler
from offload.resident import ResidentScheduler
from offload.scheduler import TransferScheduler
from tests.offload.test_scheduler import (
    MAX_ROWS,
    WIDTH,
    assert_stores_equal,
    make_opts,
    make_script,
    sched,
)
from tests.offload.test_scheduler_lookahead import predictions, run_lookahead

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def _members(proto) -> list[str]:
    return sorted({n for n in vars(proto) if not n.startswith("_")} | set(proto.__annotations__))


def _compatible(impl, spec) -> list[str]:
    """What `impl`'s signature lacks to be called as `spec` is (names, kinds, defaults)."""
    got, want = inspect.signature(impl).parameters, inspect.signature(spec).parameters
    problems = [f"missing {n}" for n in want if n not in got]
    for n, p in want.items():
        q = got.get(n)
        if q is None:
            continue
        if q.kind != p.kind and not (q.kind == q.POSITIONAL_OR_KEYWORD and p.kind != p.VAR_POSITIONAL):
            problems.append(f"{n}: kind {q.kind} != {p.kind}")
        if p.default is not p.empty and q.default != p.default:
            problems.append(f"{n}: default {q.default!r} != {p.default!r}")
    problems += [f"extra {n} without default" for n, q in got.items()
                 if n not in want and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    return problems


def _build(kind: str, opts, **kw):
    if kind == "transfer":
        return sched(opts, **kw)
    return ResidentScheduler(opts, max_rows=MAX_ROWS, **kw)


@pytest.mark.parametrize("kind", ["transfer", "resident"])
def test_scheduler_implements_the_whole_protocol(kind):
    cls = TransferScheduler if kind == "transfer" else ResidentScheduler
    with _build(kind, make_opts()) as s:
        assert isinstance(s, RowScheduler)
        for name in _members(RowScheduler):
            assert hasattr(s, name), f"{cls.__name__} lacks {name}"
            spec = getattr(RowScheduler, name, None)
            if callable(spec):
                assert _compatible(getattr(cls, name), spec) == [], f"{cls.__name__}.{name}"
        assert s.wire_dtype in offload.WIRE_DTYPES and s.max_rows == MAX_ROWS
        s.begin_step()
        h = s.fetch(0, torch.arange(3), extendable=True)
        h = s.fetch_more(0, torch.tensor([7]))
        assert isinstance(h, RowHandle)
        for name in ("wait", "release"):
            assert _compatible(getattr(type(h), name), getattr(RowHandle, name)) == []
        assert h.wait().shape == (4, WIDTH) and h.wait().dtype == s.wire_dtype
        assert torch.equal(h.ids_host, torch.tensor([0, 1, 2, 7])) and torch.equal(h.ids_dev, h.ids_host)
        s.push_grads(0, torch.tensor([7, 1]), torch.ones(2, WIDTH))
        s.finish_step()
        s.flush()
        rows = s.read_rows(0, torch.tensor([1, 7]))
        assert rows.dtype == torch.float32
        assert torch.equal(rows, s.optimizers[0].store.weights[[1, 7]] if kind == "transfer"
                           else s.layers[0].weights[[1, 7]])
        s.reserve_live_rows(2 * MAX_ROWS)
        s.sync_to_host()
        s.load_from_host()


def _kernel_update(opts):
    """The twin's plain-torch AdamW replaced by the fused kernel of the optimizer owning `weights` (same
    rule, may differ by 1 ulp): what remains to compare is the scheduling -- which rows, which grads,
    read before or after which update."""
    owner = {o.store.weights.data_ptr(): o for o in opts}

    def update(weights, exp_avg, exp_avg_sq, steps, ids, grads, **hp):
        opt = owner[weights.data_ptr()]
        assert hp == {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
        assert opt.step_rows(ids, grads)
    return update


def _run_both(staleness: int, monkeypatch=None):
    seed = 41 + staleness
    script = make_script(12, seed)
    preds = predictions(script, seed)
    ref, got = make_opts(seed), make_opts(seed)
    with sched(ref, staleness=staleness, max_live_rows=2 * MAX_ROWS) as s:
        moved_ref = run_lookahead(s, script, preds)
    if monkeypatch is not None:
        monkeypatch.setattr(resident, "reference_adamw_rows", _kernel_update(got))
    with ResidentScheduler(got, max_rows=MAX_ROWS, staleness=staleness) as r:
        r.reserve_live_rows(2 * MAX_ROWS)
        moved = run_lookahead(r, script, preds)
    assert moved == moved_ref  # rows down (prefetched + missing), rows up (needed)
    assert int(ref[0].store.steps.sum()) > 0
    return ref, got


@pytest.mark.parametrize("staleness", [0, 1])
def test_resident_fetch_more_and_partial_push_equal_transfer_bitwise(staleness, monkeypatch):
    ref, got = _run_both(staleness, monkeypatch)
    for a, b in zip(ref, got):
        for name in ("weights", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(getattr(b.store, name), getattr(a.store, name), rtol=0, atol=0)
    assert_stores_equal(ref, got)  # weights, both moments, per-row step counts


@pytest.mark.parametrize("staleness", [0, 1])
def test_resident_with_its_own_adamw_matches_transfer(staleness):
    """Unpatched: the plain-torch AdamW of the twin vs the fused kernel, a few ulp apart at most."""
    ref, got = _run_both(staleness)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.store.weights, a.store.weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.store.steps, a.store.steps)


def test_resident_refuses_what_transfer_refuses():
    """The twin shares the constructor checks and the fetch / push contract."""
    for kw, msg in [({"max_rows": 0}, "max_rows"), ({"staleness": 2}, "staleness"), ({"clip": "norm"}, "clip"),
                    ({"wire_dtype": torch.float16}, "wire_dtype"), ({"max_norm": 0}, "max_norm")]:
        with pytest.raises(ValueError, match=msg):
            ResidentScheduler(make_opts(), **{"max_rows": 4, **kw})
    with ResidentScheduler(make_opts(), max_rows=MAX_ROWS, staleness=1) as r:
        for _ in range(2):
            r.begin_step()
            h = r.fetch(0, torch.arange(4))
            r.push_grads(0, h.ids_dev, torch.ones(4, WIDTH))
            r.finish_step()
        r.begin_step()
        r.fetch(0, torch.arange(4))
        with pytest.raises(ValueError, match="already fetched"):
            r.fetch(0, torch.arange(2))
        with pytest.raises(ValueError, match="reserve_live_rows"):
            r.fetch_more(0, torch.arange(4, 4 + MAX_ROWS))
        with pytest.raises(ValueError, match="extendable=True"):
            r.fetch_more(0, torch.tensor([9]))  # the delayed update already followed the plain fetch
        with pytest.raises(ValueError, match=r"differ.*\[8\]"):
            r.push_grads(0, torch.tensor([3, 8]), torch.zeros(2, WIDTH))
        with pytest.raises(ValueError, match="repeat"):
            r.push_grads(0, torch.tensor([3, 1, 3]), torch.zeros(3, WIDTH))
        r.push_grads(0, torch.tensor([2]), torch.ones(1, WIDTH))
        with pytest.raises(ValueError, match="no live fetch"):
            r.push_grads(0, torch.tensor([2]), torch.ones(1, WIDTH))
        r.finish_step()
