"""Zero-copy fetch (`TransferScheduler(zero_copy=True)`) against synchronous training and the staged path.

On this machine the thread engine stands in for the device: the "device read" of the pinned, mapped
mirror is an `index_select` from the same host tensor on the engine's H2D thread. The random scripts of
tests/offload/test_scheduler.py drive it with injected copy delays; the result must equal the plain
synchronous training bitwise (the staged path is held to the same reference there), the mirror must
equal the fp32 master rows cast to the wire dtype after every run, and removing the one wait zero-copy
adds (a fetch waits for its layer's queued updates to write the mirror) must be detected.
"""

import pytest
import torch

from offload import kernels
from offload.engine import ThreadCopyEngine
from offload.optim import SparseAdamW, reference_adamw_rows
from offload.scheduler import TransferScheduler
from offload.store import RowStore
from tests.offload.test_scheduler import (
    N_LAYERS,
    WIDTH,
    assert_stores_equal,
    make_opts,
    make_script,
    random_delay,
    run_async,
    run_sync,
    sched,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def assert_mirrors_current(opts, wire=torch.bfloat16):
    for i, o in enumerate(opts):
        assert o.store.mirror is not None and o.store.mirror.dtype == wire
        assert torch.equal(o.store.mirror, o.store.weights.to(wire)), f"layer {i}: mirror != weights"


@pytest.mark.parametrize("staleness,clip", [(0, "none"), (0, "layer"), (1, "none"), (1, "global")])
def test_zero_copy_random_steps_bitwise_equal_to_sync(staleness, clip):
    script = make_script(150, seed=31 + staleness)
    ref, got = make_opts(31), make_opts(31)
    run_sync(ref, script, staleness=staleness, clip=clip)
    eng = ThreadCopyEngine(delay=random_delay(31, 150.0))
    with sched(got, engine=eng, staleness=staleness, clip=clip, zero_copy=True) as s:
        assert s.h2d_pool is None  # no H2D staging: rows come from the mirrors
        run_async(s, script)
    eng.close()
    assert_stores_equal(ref, got)
    assert_mirrors_current(got)
    assert int(got[0].store.steps.sum()) > 0


def test_zero_copy_fp32_wire():
    script = make_script(60, seed=5)
    ref, got = make_opts(5), make_opts(5)
    run_sync(ref, script, staleness=0, clip="none")
    with sched(got, staleness=0, wire_dtype=torch.float32, zero_copy=True) as s:
        run_async(s, script)
    assert_mirrors_current(got, torch.float32)
    # the sync reference sees bf16 rows; with an fp32 wire only the gradients' inputs differ: compare the
    # fp32-wire zero-copy run with the fp32-wire staged run instead
    staged = make_opts(5)
    with sched(staged, staleness=0, wire_dtype=torch.float32) as s:
        run_async(s, script)
    assert_stores_equal(staged, got)


def test_removed_mirror_wait_is_detected():
    """Staleness 1 with two micro-batches: a layer's previous update is applied right after its first
    fetch of the step, so its second fetch must read the updated mirror. With that wait removed (test hook)
    and the update slowed down, the device reads stale rows and the result differs from the reference."""
    script = [(2, mbs) for _, mbs in make_script(40, seed=9) if len(mbs) >= 1]
    script = [(2, [mbs[0], mbs[0]]) for _, mbs in script]  # every layer of micro-batch 0 again in 1
    results = {}
    for skip in (False, True):
        ref, got = make_opts(9), make_opts(9)
        run_sync(ref, script, staleness=1, clip="none")
        with sched(got, staleness=1, zero_copy=True) as s:
            for o in got:  # a slow update: 3 ms longer than the read that races it
                o.step = _slowed(o.step, 3e-3)
            if skip:
                s._test_skip_waits.add("mirror")
            run_async(s, script)
        try:
            assert_stores_equal(ref, got)
            results[skip] = "equal"
        except AssertionError:
            results[skip] = "differs"
    assert results == {False: "equal", True: "differs"}


def _slowed(fn, seconds):
    import time

    def slow(*args, **kw):
        time.sleep(seconds)
        return fn(*args, **kw)
    return slow


def test_zero_copy_meters_the_valid_rows_and_allocates_what_staging_bytes_counts():
    opts = [SparseAdamW(RowStore(128, 16), lr=1e-2) for _ in range(3)]
    with TransferScheduler(opts, max_rows=32, n_slots=3, zero_copy=True) as s:
        mirrors = sum(o.store.mirror.nbytes for o in opts)
        real = s.d2h_pool.nbytes + sum(st.ids_host.nbytes + st.slots_host.nbytes for st in s.layers) + mirrors
        assert real == TransferScheduler.staging_bytes(3, 32, 16, torch.bfloat16, n_slots=3, zero_copy_rows=128)
        s.begin_step()
        ids = torch.cat([torch.arange(10, 30), torch.full((12,), -1)])  # fixed-shape routing: 20 used of 32
        h = s.fetch(1, ids)
        rows = h.wait()
        assert rows.shape == (32, 16)
        torch.testing.assert_close(rows[:20], opts[1].store.weights[10:30].to(torch.bfloat16), rtol=0, atol=0)
        s.push_grads(1, ids, torch.ones(32, 16))
        s.finish_step()
        tot = s.meter.report()["totals"]
        assert tot["h2d"]["bytes"] == 20 * 16 * 2 and tot["h2d"]["rows"] == 20
        assert tot["d2h"]["bytes"] == 20 * 16 * 2
    assert int(opts[1].store.steps[10:30].min()) == 1 and int(opts[1].store.steps.sum()) == 20
    assert_mirrors_current(opts)


def test_adamw_kernel_writes_the_mirror_in_the_same_pass():
    g = torch.Generator().manual_seed(0)
    n, w = 64, 24
    weights = torch.randn(n, w, generator=g)
    m, v, steps = torch.zeros(n, w), torch.zeros(n, w), torch.zeros(n, dtype=torch.int64)
    ref = [t.clone() for t in (weights, m, v, steps)]
    mirror = weights.to(torch.bfloat16)
    ids = torch.tensor([3, 17, 40, 63])
    grads = torch.randn(4, w, generator=g)
    kernels.adamw_rows(weights.numpy(), m.numpy(), v.numpy(), steps.numpy(), ids.numpy(), grads.numpy(), 1.0,
                       1e-2, 0.9, 0.999, 1e-8, 0.01, kernels.as_numpy(mirror))
    reference_adamw_rows(*ref, ids, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    torch.testing.assert_close(weights, ref[0], rtol=1e-5, atol=1e-6)  # the twin's tolerance (test_kernels)
    torch.testing.assert_close(mirror, weights.to(torch.bfloat16), rtol=0, atol=0)  # every row, touched or not


def test_store_bulk_writes_refresh_the_mirror():
    store = RowStore(16, 4)
    store.attach_mirror(torch.empty(16, 4, dtype=torch.bfloat16))
    new = torch.randn(16, 4)
    store.set_weights(new)
    assert torch.equal(store.mirror, new.to(torch.bfloat16))
    other = RowStore(16, 4, init=torch.randn(16, 4))
    store.load_state_dict(other.state_dict())
    assert torch.equal(store.mirror, other.weights.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[16, 4\]"):
        store.attach_mirror(torch.empty(8, 4, dtype=torch.bfloat16))


def test_zero_copy_argument_is_checked():
    with pytest.raises(ValueError, match="zero_copy"):
        TransferScheduler([SparseAdamW(RowStore(8, 4))], max_rows=4, zero_copy="yes")
    assert N_LAYERS and WIDTH  # shapes shared with test_scheduler
