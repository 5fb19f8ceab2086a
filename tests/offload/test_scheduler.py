"""TransferScheduler against the same training done synchronously with no scheduler (bitwise).

A random "script" (steps, micro-batches, layers, active sets) drives both. Gradients are a fixed
function of the rows the step received, so reading stale or not-yet-landed rows changes the result.
The thread engine gets random injected delays so that missing waits would show; one test disables a
wait through the test hook and expects the mismatch (proof the comparison is sensitive).
"""

import threading
import time

import pytest
import torch

from offload.engine import ThreadCopyEngine
from offload.optim import SparseAdamW
from offload.scheduler import TransferScheduler
from offload.store import RowStore
from offload.updates import clip_scale

N_ROWS, WIDTH, N_LAYERS, MAX_ROWS = 48, 8, 3, 16
WIRE = torch.bfloat16


pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def sched(opts, **kw):
    return TransferScheduler(opts, **{"max_rows": MAX_ROWS, "host_threads": 1, **kw})


def make_script(n_steps: int, seed: int):
    """[(accum_steps, [micro-batch: [(layer, ids, grad_dtype), ...]]), ...]."""
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    script = []
    for _ in range(n_steps):
        accum = rint(1, 3)
        mbs = []
        for _ in range(accum):
            layers = sorted(torch.randperm(N_LAYERS, generator=g)[: rint(1, N_LAYERS)].tolist())
            mbs.append([(la, torch.randperm(N_ROWS, generator=g)[: rint(0, MAX_ROWS)].sort().values,
                         dtypes[rint(0, 2)]) for la in layers])
        script.append((accum, mbs))
    return script


def grads_of(rows: torch.Tensor, key: int, dtype) -> torch.Tensor:
    """Deterministic gradient [R, W] from the rows received (wire dtype) and a key."""
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(key & 0xFFFFFFFF))
    return (rows.float() * 0.7 + noise).to(dtype)


def make_opts(seed: int = 0, state_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [SparseAdamW(RowStore(N_ROWS, WIDTH, init=torch.randn(N_ROWS, WIDTH, generator=g),
                                 state_dtype=state_dtype), lr=3e-2, weight_decay=0.01)
            for _ in range(N_LAYERS)]


def _scale(opt, clip, max_norm, gscale):
    if clip == "layer":
        return clip_scale(opt.grad_sq_norm(), max_norm)
    return gscale if clip == "global" else 1.0


def run_sync(opts, script, *, staleness, clip, max_norm=1.0, wire=WIRE):
    """The plain definition: gather, gradient, sum the step's gradients in fp32 and round the sum to the wire
    dtype once; updates at the boundary or delayed by one."""
    pending, gscale = [False] * N_LAYERS, [1.0] * N_LAYERS
    buf = torch.empty(MAX_ROWS, WIDTH, dtype=wire)
    for t, (_accum, mbs) in enumerate(script):
        with_grads = set()
        sums = [torch.zeros(N_ROWS, WIDTH) for _ in range(N_LAYERS)]  # [N, W] fp32 per layer
        order = [[] for _ in range(N_LAYERS)]  # row ids in order of first appearance in the step
        for m, mb in enumerate(mbs):
            for layer, ids, dt in mb:
                opt = opts[layer]
                rows = opt.store.gather(ids, buf).clone()
                if pending[layer]:  # staleness 1: the previous update, right after this gather
                    opt.step(_scale(opt, clip, max_norm, gscale[layer]))
                    pending[layer] = False
                g = grads_of(rows, hash((t, m, layer)), dt)
                sums[layer].index_add_(0, ids, g.float())
                order[layer] += [i for i in ids.tolist() if i not in order[layer]]
                with_grads.add(layer)
        for layer in with_grads:  # one push per layer and step, in the order rows first appeared (norm sums)
            ids = torch.tensor(order[layer], dtype=torch.int64)
            opts[layer].accumulate(ids, sums[layer][ids].to(wire))
        if clip == "global":
            sq = sum(opts[la].grad_sq_norm() for la in sorted(with_grads))
            for la in with_grads:
                gscale[la] = clip_scale(sq, max_norm)
        for la in sorted(with_grads):
            if staleness == 0:
                opts[la].step(_scale(opts[la], clip, max_norm, gscale[la]))
            else:
                pending[la] = True
    for la in range(N_LAYERS):
        if pending[la]:
            opts[la].step(_scale(opts[la], clip, max_norm, gscale[la]))


def run_async(sched, script, *, flush=True):
    for t, (accum, mbs) in enumerate(script):
        sched.begin_step(accum)
        for m, mb in enumerate(mbs):
            sched.begin_micro_batch()
            handles = {layer: (sched.fetch(layer, ids), dt) for layer, ids, dt in mb}
            for layer in sorted(handles, reverse=True):  # backward order
                h, dt = handles[layer]
                g = grads_of(h.wait().clone(), hash((t, m, layer)), dt)
                sched.push_grads(layer, h.ids_dev, g)
        sched.finish_step()
    if flush:
        sched.flush()


def random_delay(seed: int, max_us: float = 150.0):
    g = torch.Generator().manual_seed(seed)
    lock = threading.Lock()

    def delay(direction, nbytes):
        with lock:
            return float(torch.rand((), generator=g)) * max_us * 1e-6
    return delay


def assert_stores_equal(a, b):
    for oa, ob in zip(a, b):
        for name in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            x, y = getattr(oa.store, name), getattr(ob.store, name)
            assert torch.equal(x, y), f"{name} differs"


def check_equal_to_sync(n_steps, seed, *, staleness, clip, delay_us=150.0, max_norm=1.0, **kw):
    script = make_script(n_steps, seed)
    ref, got = make_opts(seed), make_opts(seed)
    run_sync(ref, script, staleness=staleness, clip=clip, max_norm=max_norm)
    eng = ThreadCopyEngine(delay=random_delay(seed, delay_us))
    with sched(got, engine=eng, staleness=staleness, clip=clip, max_norm=max_norm, **kw) as s:
        run_async(s, script)
    eng.close()
    assert_stores_equal(ref, got)
    return ref


@pytest.mark.parametrize("staleness,clip", [(0, "layer"), (1, "global")])
def test_1000_random_steps_bitwise_equal_to_sync(staleness, clip):
    ref = check_equal_to_sync(1000, seed=staleness + 1, staleness=staleness, clip=clip)
    assert int(ref[0].store.steps.sum()) > 0  # training happened


@pytest.mark.parametrize("staleness,clip", [(0, "none"), (0, "global"), (1, "none"), (1, "layer")])
def test_random_steps_other_modes(staleness, clip):
    check_equal_to_sync(150, seed=7 + staleness, staleness=staleness, clip=clip, n_slots=3)


def test_fp32_wire_and_bf16_moments():
    script = make_script(60, 3)
    ref, got = make_opts(3, torch.bfloat16), make_opts(3, torch.bfloat16)
    buf = torch.empty(MAX_ROWS, WIDTH)
    for t, (_, mbs) in enumerate(script):  # the fp32-wire synchronous definition
        with_grads = set()
        for m, mb in enumerate(mbs):
            for layer, ids, dt in mb:
                rows = ref[layer].store.gather(ids, buf).clone()
                ref[layer].accumulate(ids, grads_of(rows, hash((t, m, layer)), dt).float())
                with_grads.add(layer)
        for la in with_grads:
            ref[la].step()
    with sched(got, wire_dtype=torch.float32) as s:
        run_async(s, script)
    assert_stores_equal(ref, got)


def test_staleness1_differs_from_staleness0():
    """Sanity: the two definitions really differ (so each equality test checks its own semantics)."""
    script = make_script(40, 5)
    a, b = make_opts(5), make_opts(5)
    run_sync(a, script, staleness=0, clip="none")
    run_sync(b, script, staleness=1, clip="none")
    assert not torch.equal(a[0].store.weights, b[0].store.weights)


@pytest.mark.parametrize("hook", ["h2d", "d2h"])
def test_disabled_wait_is_detected(hook):
    """With the wait removed (test hook) and delayed copies, the result must differ from sync."""
    script = make_script(30, 11)
    ref, got = make_opts(11), make_opts(11)
    run_sync(ref, script, staleness=0, clip="none")
    eng = ThreadCopyEngine(delay=lambda d, n: 2e-3 if d == hook else 0.0)
    with sched(got, engine=eng) as s:
        s._test_skip_waits.add(hook)
        run_async(s, script)
        s._test_skip_waits.clear()
    eng.close()
    with pytest.raises(AssertionError, match="differs"):
        assert_stores_equal(ref, got)


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
def test_metered_bytes_equal_analytic(wire):
    script = make_script(25, 13)
    with sched(make_opts(13), wire_dtype=wire) as s:
        s.meter.keep_steps = 100
        run_async(s, script)
        rep = s.meter.report()
    esize = torch.empty((), dtype=wire).element_size()
    total = 0
    assert any(len(mbs) > 1 for _, mbs in script)  # accumulation is exercised
    for t, (_, mbs) in enumerate(script, start=1):
        # the analytic minimum: each layer's rows cross once per step (the union of its micro-batches' rows),
        # and so do their gradients
        rows = sum(len(set().union(*[set(ids.tolist()) for mb in mbs for la, ids, _ in mb if la == layer]))
                   for layer in range(N_LAYERS))
        total += rows
        for d in ("h2d", "d2h"):
            assert rep["per_step"][t][d]["bytes"] == rows * WIDTH * esize
            assert rep["per_step"][t][d]["rows"] == rows
    for d in ("h2d", "d2h"):
        assert rep["totals"][d]["bytes"] == total * WIDTH * esize
    assert rep["cpu"]["update"]["count"] > 0 and rep["pageable_copies"] == 0


def test_backpressure_two_slots_slow_link():
    eng = ThreadCopyEngine(link_gbps=0.002, latency_us=200)  # 2 MB/s: 256 B rows take ~0.3 ms each
    opts = [SparseAdamW(RowStore(N_ROWS, WIDTH)) for _ in range(8)]
    with sched(opts, engine=eng, n_slots=2) as s:
        before = s.stats()["staging_bytes"]
        for _ in range(3):
            s.begin_step()
            hs = [s.fetch(la, torch.arange(MAX_ROWS)) for la in range(8)]  # no waits: all in flight
            for la in reversed(range(8)):
                s.push_grads(la, hs[la].ids_dev, hs[la].wait().float())
            s.finish_step()
        st = s.stats()
    eng.close()
    assert st["h2d_peak_slots"] == 2 and st["d2h_peak_slots"] == 2
    assert st["h2d_waits"] > 0  # the caller was held back
    assert st["staging_bytes"] == before == 2 * 2 * (MAX_ROWS * WIDTH * 2 + MAX_ROWS * 8)


def test_memory_does_not_grow_with_steps():
    script = make_script(200, 17)
    with sched(make_opts(17), staleness=1) as s:
        s.meter.keep_steps = 4
        run_async(s, script[:100], flush=False)
        mid = (s.stats(), len(s.meter._raw))
        run_async(s, script[100:])
        end = (s.stats(), len(s.meter._raw))
    assert mid[0]["staging_bytes"] == end[0]["staging_bytes"]
    assert mid[1] == end[1] == 4
    assert end[0]["host_queue"] == 0


def test_update_uses_the_lr_set_when_its_step_ran_not_later():
    """An lr change made right after the step's gradients are pushed (as an lr scheduler does) must not
    leak into that step's queued updates, however late the worker runs them."""
    results = []
    for delay in (0.0, 0.2):
        eng = ThreadCopyEngine(delay=(lambda d, n, s=delay: s))
        opts = [SparseAdamW(RowStore(N_ROWS, WIDTH), lr=1e-2) for _ in range(2)]
        with sched(opts, engine=eng) as s:
            s.begin_step()
            hs = [s.fetch(la, torch.arange(8)) for la in range(2)]
            for la in reversed(range(2)):
                s.push_grads(la, hs[la].ids_dev, torch.ones(8, WIDTH))
            for o in opts:  # the caller moves on to the next step's lr before the updates ran
                o.lr = 123.0
            s.finish_step()
        eng.close()
        results.append([o.store.weights.clone() for o in opts])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results[0][0][:8].abs().max() < 1.0  # lr 1e-2 was used, not 123


@pytest.mark.parametrize("live", [None, 64])
def test_staging_bytes_is_what_the_scheduler_allocates(live):
    """`TransferScheduler.staging_bytes` (what wrap's RAM check and `meft plan` count) equals the host
    staging really allocated: both pools' slots and every layer's ids buffer."""
    opts = [SparseAdamW(RowStore(128, 16), lr=1e-2) for _ in range(3)]
    with TransferScheduler(opts, max_rows=32, n_slots=3, wire_dtype=torch.bfloat16, max_live_rows=live) as s:
        real = s.h2d_pool.nbytes + s.d2h_pool.nbytes + sum(st.ids_host.nbytes + st.slots_host.nbytes for st in s.layers)
        assert real == TransferScheduler.staging_bytes(3, 32, 16, torch.bfloat16, n_slots=3, max_live_rows=live)


@pytest.mark.parametrize("hold", [True, False])
def test_staleness1_parked_updates_never_run_during_a_forward(hold):
    """Staleness 1 parks layer l's update right after layer l's gather of the next step. During that
    forward the worker must not spend idle gaps between two layers' fetches on parked updates (a gather
    arriving then would queue behind one): they wait for backward (the first push). Negative control
    (hold=False: the hold removed) shows the gaps are real: parked updates then run inside the forward."""
    opts = [SparseAdamW(RowStore(4096, 64), lr=1e-2) for _ in range(4)]
    ids = torch.arange(256)
    with TransferScheduler(opts, max_rows=256, staleness=1) as s:
        if not hold:
            s.worker.hold_idle = lambda: None  # what the scheduler relies on, switched off
        for _step in range(2):
            s.begin_step()
            hs = []
            for la in range(4):  # the forward: fetch every layer, with compute-sized gaps between them
                hs.append(s.fetch(la, ids))
                hs[-1].wait()
                time.sleep(0.05)
            during_forward = s.worker.parked_runs_in_idle
            for la in reversed(range(4)):  # backward
                s.push_grads(la, ids, torch.ones(256, 64))
            s.finish_step()
        s.flush()
    if hold:
        assert during_forward == 0  # step 2's forward: four parked updates, none run in its gaps
    else:
        assert during_forward > 0


@pytest.mark.parametrize("accum, fused", [(1, True), (2, True)])
def test_one_push_per_step_updates_in_one_pass_from_the_staging_slot(accum, fused):
    """A layer's gradients of a step cross once (one micro-batch, or the step union under accumulation); at
    staleness 0 without clipping they are not accumulated on the host first: the update reads them once,
    straight from the staging slot (SparseAdamW.step_rows). The rows equal the two-pass path's bitwise (the
    1,000-step tests above compare with synchronous training)."""
    opts = [SparseAdamW(RowStore(64, 8, init=torch.randn(64, 8, generator=torch.Generator().manual_seed(0))),
                        lr=1e-2) for _ in range(2)]
    ref = [SparseAdamW(RowStore(64, 8, init=o.store.weights.clone()), lr=1e-2) for o in opts]
    ids = torch.arange(16)
    with TransferScheduler(opts, max_rows=16) as s:
        s.begin_step(accum)
        for mb in range(accum):
            if mb:
                s.begin_micro_batch()
            for la in range(2):
                s.fetch(la, ids).wait()
                s.push_grads(la, ids, torch.full((16, 8), 0.5 + la))
        s.finish_step()
        ops = s.meter.report()["cpu"]
    for la, o in enumerate(ref):
        o.accumulate(ids, torch.full((16, 8), accum * (0.5 + la)).to(torch.bfloat16))  # the step's sum, rounded once
        o.step()
        torch.testing.assert_close(opts[la].store.weights, o.store.weights, rtol=0, atol=0)
    assert ("accumulate" not in ops) == fused and ops["update"]["count"] == 2
