"""TransferScheduler prefetch-then-complete: `fetch(..., extendable=True)` + `fetch_more` + partial pushes.

A random script gives each (step, micro-batch, layer) a *needed* set N (what the layer really uses)
and a *predicted* set P (a lookahead prefetch that overlaps N). The scheduler prefetches P, adds only
N \\ P with `fetch_more`, takes N's rows from the chain by position and pushes gradients for N only.
That must equal, bitwise, the plain synchronous training on N (`run_sync` of test_scheduler), under
injected copy delays, for staleness 0 and 1 (the delayed update must not slip between the prefetch's
gather and the missing rows' gather), and the meter must count exactly P + (N \\ P) rows down, N up.
"""

import pytest
import torch

from offload.engine import ThreadCopyEngine
from offload.scheduler import TransferScheduler
from tests.offload.test_scheduler import (
    MAX_ROWS,
    N_ROWS,
    WIDTH,
    assert_stores_equal,
    grads_of,
    make_opts,
    make_script,
    random_delay,
    run_sync,
    sched,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def predictions(script, seed: int):
    """For each needed set N of the script, a prediction P ([<= MAX_ROWS] sorted unique): some of N
    (sometimes all, sometimes N exactly) plus rows N does not need."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _accum, mbs in script:
        out.append([])
        for mb in mbs:
            preds = []
            for _layer, ids, _dt in mb:
                kind = int(torch.randint(0, 4, (1,), generator=g))
                if kind == 0:
                    p = ids.clone()  # exact prediction
                else:
                    keep = ids[torch.rand(ids.numel(), generator=g) < (0.5 if kind == 1 else 1.0)]
                    extra = torch.randperm(N_ROWS, generator=g)[: int(torch.randint(0, 8, (1,), generator=g))]
                    p = torch.unique(torch.cat([keep, extra]))[:MAX_ROWS]  # sorted
                preds.append(p)
            out[-1].append(preds)
    return out


def chain_rows(sched, layer, ids, pred):
    """Prefetch `pred`, add the misses, return (rows of `ids` in ids order, rows moved down)."""
    h = sched.fetch(layer, pred, extendable=True)
    hit = torch.isin(ids, pred)
    pos = torch.empty_like(ids)
    pos[hit] = torch.searchsorted(pred, ids[hit])
    miss = ids[~hit]
    if miss.numel():
        pos[~hit] = pred.numel() + torch.arange(miss.numel())
        h = sched.fetch_more(layer, miss)
    return h, pos, pred.numel() + miss.numel()


def run_lookahead(sched, script, preds):
    """Like test_scheduler.run_async, but every fetch is a prefetch completed by fetch_more."""
    down = up = 0
    for t, (accum, mbs) in enumerate(script):
        sched.begin_step(accum)
        for m, mb in enumerate(mbs):
            sched.begin_micro_batch()
            # all prefetches first (as a lookahead would), then the completions, then backward
            heads = {layer: sched.fetch(layer, p, extendable=True) for (layer, _, _), p in zip(mb, preds[t][m])}
            chains = {}
            for (layer, ids, dt), p in zip(mb, preds[t][m]):
                hit = torch.isin(ids, p)
                pos = torch.empty_like(ids)
                pos[hit] = torch.searchsorted(p, ids[hit])
                h, miss = heads[layer], ids[~hit]
                if miss.numel():
                    pos[~hit] = p.numel() + torch.arange(miss.numel())
                    h = sched.fetch_more(layer, miss)
                chains[layer] = (h, pos, ids, dt)
                down += p.numel() + miss.numel()
            for layer in sorted(chains, reverse=True):  # backward order
                h, pos, ids, dt = chains[layer]
                rows = h.wait().index_select(0, pos)  # [N, W] in the order of ids
                sched.push_grads(layer, ids, grads_of(rows, hash((t, m, layer)), dt))
                up += ids.numel()
        sched.finish_step()
    sched.flush()
    return down, up


@pytest.mark.parametrize("staleness,clip", [(0, "none"), (0, "layer"), (1, "none"), (1, "global")])
def test_prefetch_completed_by_fetch_more_equals_sync_bitwise(staleness, clip):
    seed = 21 + staleness
    script = make_script(120, seed)
    preds = predictions(script, seed)
    ref, got = make_opts(seed), make_opts(seed)
    run_sync(ref, script, staleness=staleness, clip=clip)
    eng = ThreadCopyEngine(delay=random_delay(seed, 150.0))
    with sched(got, engine=eng, staleness=staleness, clip=clip, max_live_rows=2 * MAX_ROWS) as s:
        down, up = run_lookahead(s, script, preds)
        s.flush()
        tot = s.meter.report()["totals"]
    eng.close()
    assert_stores_equal(ref, got)  # weights, both moments, per-row step counts
    assert int(ref[0].store.steps.sum()) > 0
    wire = 2  # bf16
    want_down, want_up = expected_rows(script, preds, staleness)
    assert tot["h2d"]["rows"] == want_down and tot["h2d"]["bytes"] == want_down * WIDTH * wire
    assert tot["d2h"]["rows"] == want_up and tot["d2h"]["bytes"] == want_up * WIDTH * wire
    needed = sum(ids.numel() for _, mbs in script for mb in mbs for _, ids, _ in mb)
    assert up == needed and down > needed  # the script really has misses and unneeded prefetches


def expected_rows(script, preds, staleness):
    """Rows that must cross: one micro-batch per step, P + misses down and the needed rows up; with
    accumulation, per layer and step the union of the chains' rows down once (at staleness 1 rows go
    down for every micro-batch: the delayed update lands between them) and the union of the needed rows up
    once (host ids: the scheduler knows which rows were pushed)."""
    down = up = 0
    for t, (accum, mbs) in enumerate(script):
        chains = {}
        for m, mb in enumerate(mbs):
            for (layer, ids, _), p in zip(mb, preds[t][m]):
                chains.setdefault(layer, []).append((set(p.tolist()) | set(ids.tolist()), set(ids.tolist())))
        for parts in chains.values():
            fetched = set().union(*[r for r, _ in parts])
            if accum == 1:
                down += len(fetched)
            else:
                down += sum(len(r) for r, _ in parts) if staleness else len(fetched)
            up += len(set().union(*[need for _, need in parts]))  # needed rows only, once per step
    return down, up


def test_staleness1_without_extendable_refuses_fetch_more():
    """The delayed update follows a plain fetch's gather; rows added after it would be newer: refused."""
    with sched(make_opts(), staleness=1, max_live_rows=2 * MAX_ROWS) as s:
        for _ in range(2):
            s.begin_step()
            h = s.fetch(0, torch.arange(4))
            s.push_grads(0, h.ids_dev, torch.ones(4, WIDTH))
            s.finish_step()
        s.begin_step()
        s.fetch(0, torch.arange(4))  # step 2's update is now queued after this gather
        with pytest.raises(ValueError, match="extendable=True"):
            s.fetch_more(0, torch.tensor([9]))
        s.finish_step()


def test_untouched_prefetched_rows_stay_bit_identical():
    opts = make_opts(3)
    before = {n: getattr(opts[1].store, n).clone() for n in ("weights", "exp_avg", "exp_avg_sq", "steps")}
    pred, need = torch.arange(0, 10), torch.arange(5, 15)
    for staleness in (0, 1):
        opts = make_opts(3)
        with sched(opts, staleness=staleness, max_live_rows=2 * MAX_ROWS) as s:
            for _ in range(3):
                s.begin_step()
                h, pos, _ = chain_rows(s, 1, need, pred)
                rows = h.wait().index_select(0, pos)
                if staleness == 0:  # rows are the current ones (staleness 1: the update may be running)
                    expect = opts[1].store.weights[need].to(rows.dtype)
                    torch.testing.assert_close(rows, expect, rtol=0, atol=0)
                s.push_grads(1, need, torch.randn(need.numel(), WIDTH))
                s.finish_step()
        st = opts[1].store
        untouched = torch.arange(0, 5)
        for name, t in before.items():
            assert torch.equal(getattr(st, name)[untouched], t[untouched]), f"{name} of unneeded rows changed"
        assert torch.equal(st.steps[need], torch.full((10,), 3))
        assert int(st.steps[15:].sum()) == 0


def test_push_validation_and_capacity():
    opts = make_opts()
    with sched(opts, max_live_rows=2 * MAX_ROWS) as s:
        s.begin_step()
        h = s.fetch(0, torch.arange(0, 8), extendable=True)
        with pytest.raises(ValueError, match="empty"):
            s.fetch_more(0, torch.tensor([], dtype=torch.int64))
        with pytest.raises(ValueError, match="no live fetch"):
            s.fetch_more(1, torch.tensor([3]))
        h = s.fetch_more(0, torch.arange(20, 20 + MAX_ROWS))  # 8 + 16 rows <= 32
        assert h.n_rows == 8 + MAX_ROWS and h.wait().shape == (8 + MAX_ROWS, WIDTH)
        assert torch.equal(h.ids_host, torch.cat([torch.arange(8), torch.arange(20, 20 + MAX_ROWS)]))
        assert torch.equal(h.ids_dev, h.ids_host)
        with pytest.raises(ValueError, match="max_live_rows=32"):
            s.fetch_more(0, torch.arange(40, 40 + 9))  # 24 + 9 > 32
        with pytest.raises(ValueError, match=r"differ.*\[8\]"):
            s.push_grads(0, torch.tensor([3, 8, 21]), torch.zeros(3, WIDTH))  # 8 was never fetched
        with pytest.raises(ValueError, match="repeat"):
            s.push_grads(0, torch.tensor([3, 21, 3]), torch.zeros(3, WIDTH))
        with pytest.raises(ValueError, match=r"expected \(2, 8\)"):
            s.push_grads(0, torch.tensor([3, 21]), torch.zeros(3, WIDTH))
        before = opts[0].store.weights.clone()
        s.push_grads(0, torch.tensor([21, 3]), torch.ones(2, WIDTH))  # any order
        with pytest.raises(ValueError, match="no longer valid"):
            h.wait()
        s.finish_step()
        changed = (opts[0].store.weights != before).any(dim=1).nonzero().flatten()
        assert changed.tolist() == [3, 21]
    with sched(make_opts()) as s:  # default capacity: max_rows
        s.begin_step()
        s.fetch(0, torch.arange(10))
        with pytest.raises(ValueError, match="reserve_live_rows"):
            s.fetch_more(0, torch.arange(10, 17))
        s.finish_step()
        s.reserve_live_rows(2 * MAX_ROWS)
        s.begin_step()
        s.fetch(0, torch.arange(10))
        assert s.fetch_more(0, torch.arange(10, 17)).wait().shape == (17, WIDTH)
        with pytest.raises(ValueError, match="step is in progress"):
            s.reserve_live_rows(3 * MAX_ROWS)
        s.finish_step()
    with pytest.raises(ValueError, match="max_live_rows"):
        TransferScheduler(make_opts(), max_rows=8, max_live_rows=7)


def test_full_push_of_plain_fetch_unchanged_and_subset_of_plain_fetch():
    """A plain fetch may also be pushed partially (rows not needed after all get nothing)."""
    opts = make_opts(5)
    with sched(opts) as s:
        s.begin_step()
        s.fetch(2, torch.arange(6)).wait()  # the rows landed (and their copy was metered) before use
        s.push_grads(2, torch.tensor([1, 4]), torch.ones(2, WIDTH))
        s.finish_step()
        tot = s.meter.report()["totals"]
    assert opts[2].store.steps.tolist()[:6] == [0, 1, 0, 0, 1, 0]
    assert tot["h2d"]["rows"] == 6 and tot["d2h"]["rows"] == 2
