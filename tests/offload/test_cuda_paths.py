"""TransferScheduler on CUDA (copy streams, events, pinned staging, device or host ids) against the same
training on the CPU thread engine, and against the resident twin on the GPU. Skipped without CUDA.

A seeded script (steps, micro-batches, layers, fetched / pushed ids, gradient dtypes) drives every run;
each gradient is a fixed, correctly rounded function of the rows the step received, `(rows * 0.7 +
noise).to(dtype)`, computed on the device for CUDA and on the host for the thread engine. The host side
(gather, accumulate, SparseAdamW) is the same numba code either way, so the CUDA run must equal the
thread-engine run bitwise: stale or not-yet-landed rows would change it. With `lag`, the compute
stream sleeps (`torch.cuda._sleep`) before every fetch, so copies queue behind compute and a missing
stream wait reads old rows. The resident twin (`offload.ResidentScheduler`, torch AdamW on the GPU)
is compared with fp32 on the wire, to float rounding.

Shapes mirror tests/offload/test_scheduler.py: 3 layers of 48 rows x 8, at most 16 rows per fetch.
"""

from __future__ import annotations

import pytest
import torch

import offload

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]

N_ROWS, WIDTH, N_LAYERS, MAX_ROWS = 48, 8, 3, 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAG_CYCLES = 2_000_000  # GPU clock cycles of sleep before each fetch (~1 ms)
STATE = ("weights", "exp_avg", "exp_avg_sq", "steps")


class Item:
    """One layer in one micro-batch: rows fetched (+ fetch_more), rows pushed and their gradient noise."""

    def __init__(self, layer, fetch, more, push, noise, dtype, full):
        self.layer, self.fetch, self.more, self.push = layer, fetch, more, push  # [n0], [m], [k] int64
        self.noise, self.dtype, self.full = noise, dtype, full  # [k, W] fp32; push handle.ids_dev if full
        where = {int(v): i for i, v in enumerate(torch.cat([fetch, more]))}
        self.pos = torch.tensor([where[int(v)] for v in push], dtype=torch.int64)  # [k] rows of `push`


def make_script(n_steps: int, seed: int, mode: str = "full", accum: int | None = None,
                all_layers: bool = False):
    """[step: [micro-batch: [Item]]]. mode: 'full' (push what was fetched), 'partial' (a strict subset in
    another order), 'permuted' (every fetched row, in another order), 'chain' (a prefetch that overlaps
    the needed rows, completed by fetch_more with the misses; the needed rows are pushed)."""
    g = torch.Generator().manual_seed(seed)

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def pick(n: int) -> torch.Tensor:
        return torch.randperm(N_ROWS, generator=g)[:n]

    script = []
    for _ in range(n_steps):
        mbs = []
        for _ in range(accum or rint(1, 3)):
            layers = range(N_LAYERS) if all_layers else torch.randperm(N_LAYERS, generator=g)[: rint(1, N_LAYERS)]
            items = []
            for layer in sorted(int(la) for la in layers):
                need = pick(rint(1, MAX_ROWS)).sort().values
                fetch, more, push = need, need[:0], need
                if mode == "partial":
                    push = need[torch.randperm(need.numel(), generator=g)[: rint(1, max(1, need.numel() - 1))]]
                elif mode == "permuted":
                    push = need[torch.randperm(need.numel(), generator=g)]
                elif mode == "chain":
                    keep = need[torch.rand(need.numel(), generator=g) < 0.5]
                    fetch = torch.unique(torch.cat([keep, pick(rint(1, 6))]))[:MAX_ROWS]  # sorted
                    more = need[~torch.isin(need, fetch)]
                noise = torch.randn(push.numel(), WIDTH, generator=g)
                items.append(Item(layer, fetch, more, push, noise, GRAD_DTYPES[rint(0, 2)], mode == "full"))
            mbs.append(items)
        script.append(mbs)
    return script


def make_opts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [offload.SparseAdamW(offload.RowStore(N_ROWS, WIDTH, init=torch.randn(N_ROWS, WIDTH, generator=g)),
                                lr=3e-2, weight_decay=0.01) for _ in range(N_LAYERS)]


def run(sched, script, device: str, *, device_ids: bool, lag: bool) -> None:
    """Forward: fetch every layer of the micro-batch; backward (reverse layer order): wait, gradients, push."""
    dev = torch.device(device)
    put = (lambda t: t.to(dev)) if device_ids else (lambda t: t)
    staged = [[[(it, put(it.fetch), put(it.more), put(it.push), it.pos.to(dev), it.noise.to(dev))
                for it in items] for items in mbs] for mbs in script]  # uploaded before the run: no sync in it
    chain = any(it.more.numel() for mbs in script for items in mbs for it in items)
    for mbs in staged:
        sched.begin_step(len(mbs))
        for items in mbs:
            sched.begin_micro_batch()
            live = {}
            for it, fetch, more, push, pos, noise in items:
                if lag:
                    torch.cuda._sleep(LAG_CYCLES)  # compute keeps the stream busy: copies must wait for it
                h = sched.fetch(it.layer, fetch, extendable=chain)
                if it.more.numel():
                    h = sched.fetch_more(it.layer, more)
                live[it.layer] = (h, it, push, pos, noise)
            for layer in sorted(live, reverse=True):
                h, it, push, pos, noise = live[layer]
                rows = h.wait().index_select(0, pos)  # [k, W] wire dtype, in the order of `push`
                grads = (rows.float() * 0.7 + noise).to(it.dtype)
                sched.push_grads(layer, h.ids_dev if it.full else push, grads)
        sched.finish_step()
    sched.flush()


def train(kind: str, script, *, wire=torch.bfloat16, device_ids=True, lag=False, **kw):
    """kind: 'cuda' / 'cpu' (TransferScheduler with the CUDA / thread engine) or 'resident' (on the GPU)."""
    opts = make_opts()
    args = dict(wire_dtype=wire, max_rows=MAX_ROWS, max_live_rows=2 * MAX_ROWS, **kw)
    if kind == "resident":
        sched = offload.ResidentScheduler(opts, device="cuda", **args)
    else:
        sched = offload.TransferScheduler(opts, device=kind, host_threads=1, **args)
    with sched:
        run(sched, script, "cpu" if kind == "cpu" else "cuda", device_ids=device_ids and kind != "cpu",
            lag=lag and kind != "cpu")
        if kind == "cuda":
            assert sched.meter.report()["pageable_copies"] == 0  # every copy used pinned staging
    return opts


def assert_same(got, ref, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert int(ref[0].store.steps.sum()) > 0  # training happened
    for i, (a, b) in enumerate(zip(got, ref)):
        for name in STATE:
            tol = {"rtol": 0.0, "atol": 0.0} if name == "steps" else {"rtol": rtol, "atol": atol}
            torch.testing.assert_close(getattr(a.store, name), getattr(b.store, name), **tol,
                                       msg=lambda m, i=i, name=name: f"layer {i} {name}: {m}")


CASES = [  # staleness, clip, device ids, lagging GPU
    (0, "none", True, False), (0, "none", False, True), (0, "layer", True, True), (0, "global", True, True),
    (1, "none", True, True), (1, "layer", False, False), (1, "global", True, True)]


@pytest.mark.parametrize("staleness,clip,device_ids,lag", CASES)
def test_fetch_push_equals_cpu_engine_bitwise(staleness, clip, device_ids, lag):
    script = make_script(40, seed=1 + staleness)
    kw = dict(staleness=staleness, clip=clip, max_norm=0.5)
    assert_same(train("cuda", script, device_ids=device_ids, lag=lag, **kw), train("cpu", script, **kw))


@pytest.mark.parametrize("staleness", [0, 1])
def test_accumulation_over_two_micro_batches_equals_cpu_engine(staleness):
    script = make_script(30, seed=5, accum=2, all_layers=True)  # every layer in both micro-batches
    kw = dict(staleness=staleness, clip="layer", max_norm=0.5)
    got = train("cuda", script, lag=True, **kw)
    assert_same(got, train("cpu", script, **kw))
    assert int(got[0].store.steps.max()) <= 30  # one update per step, not one per micro-batch


@pytest.mark.parametrize("staleness,device_ids", [(0, True), (0, False), (1, True)])
def test_partial_push_in_another_order_equals_cpu_engine(staleness, device_ids):
    script = make_script(40, seed=11, mode="partial")
    kw = dict(staleness=staleness, clip="global", max_norm=0.5)
    assert_same(train("cuda", script, device_ids=device_ids, lag=True, **kw), train("cpu", script, **kw))


@pytest.mark.parametrize("device_ids", [True, False])
def test_push_of_every_fetched_row_in_another_order(device_ids):
    """All R fetched rows pushed in a permuted order: gradients must follow the ids given, not the
    fetch order (device ids as many as the fetch's are not compared on the host)."""
    script = make_script(30, seed=13, mode="permuted")
    assert_same(train("cuda", script, device_ids=device_ids), train("cpu", script))


@pytest.mark.parametrize("staleness,clip,device_ids", [(0, "none", True), (0, "layer", False),
                                                       (1, "none", True), (1, "global", True)])
def test_fetch_more_chain_equals_cpu_engine(staleness, clip, device_ids):
    script = make_script(40, seed=21 + staleness, mode="chain")
    kw = dict(staleness=staleness, clip=clip, max_norm=0.5)
    assert_same(train("cuda", script, device_ids=device_ids, lag=True, **kw), train("cpu", script, **kw))


@pytest.mark.parametrize("mode,staleness,clip", [("full", 0, "none"), ("full", 1, "global"),
                                                 ("partial", 0, "layer"), ("chain", 1, "none")])
def test_equals_resident_twin_on_gpu(mode, staleness, clip):
    """Same semantics with every row on the GPU (torch AdamW there); fp32 wire, so only the update's
    float rounding differs (no bf16 rounding of rows to amplify it)."""
    script = make_script(30, seed=31, mode=mode)
    kw = dict(wire=torch.float32, staleness=staleness, clip=clip, max_norm=0.5)
    assert_same(train("cuda", script, lag=True, **kw), train("resident", script, **kw), rtol=1e-5, atol=1e-5)


def test_ids_dev_of_a_host_id_fetch_holds_its_ids_while_the_gpu_lags():
    """fetch(host ids) stages them in ids_host and queues their H2D behind compute; the layer's next
    fetch must not overwrite ids_host before that copy has run."""
    a, b = torch.arange(0, 8), torch.arange(20, 28)
    zeros = torch.zeros(8, WIDTH, device="cuda")
    with offload.TransferScheduler(make_opts(), device="cuda", max_rows=MAX_ROWS, host_threads=1) as s:
        s.begin_step()  # warm-up step (kernels compiled, buffers touched): the host then runs far ahead
        s.fetch(1, b).wait()
        s.push_grads(1, b, zeros)
        s.finish_step()
        s.begin_step(2)
        torch.cuda._sleep(100 * LAG_CYCLES)  # ~0.1 s of compute ahead of every copy below
        h = s.fetch(0, a)
        seen = h.ids_dev.clone()  # runs on the compute stream once the ids' H2D has landed
        s.push_grads(0, h.ids_dev, zeros)
        s.begin_micro_batch()
        h = s.fetch(0, b)  # host ids again: ids_host is rewritten while the first ids' H2D still waits
        s.push_grads(0, h.ids_dev, zeros)
        s.finish_step()
    assert seen.cpu().tolist() == a.tolist()


@pytest.mark.parametrize("timing", [False, True])
def test_pinned_bytes_are_exactly_the_staging_and_stores_are_not_pinned(timing):
    """Staging is page-locked at its exact size (cudaHostRegister, no power-of-two rounding) and equals
    what wrap's RAM check and `meft plan` count; the fp32 stores, which no copy reads, are not pinned."""
    opts = make_opts()
    with offload.TransferScheduler(opts, device="cuda", max_rows=MAX_ROWS, timing=timing) as s:
        assert s.engine.pinned_bytes == offload.TransferScheduler.staging_bytes(
            N_LAYERS, MAX_ROWS, WIDTH, torch.bfloat16)
        for pool in (s.h2d_pool, s.d2h_pool):
            assert all(slot.rows.is_pinned() and slot.ids.is_pinned() for slot in pool.slots)
        assert not any(o.store.weights.is_pinned() or o.store.exp_avg.is_pinned() for o in opts)
        s.begin_step()
        h = s.fetch(0, torch.arange(MAX_ROWS))
        h.wait()
        s.push_grads(0, h.ids_dev, torch.zeros(MAX_ROWS, WIDTH, device="cuda"))
        s.finish_step()
        rec = s.meter.report()["totals"]
        assert rec["h2d"]["bytes"] == MAX_ROWS * WIDTH * 2 and s.meter.report()["pageable_copies"] == 0


# ------------------------------------------------------------------------------------------ zero-copy
ZERO_COPY_CASES = [  # staleness, clip, device ids, lagging GPU, script mode
    (0, "none", True, True, "full"), (0, "layer", False, True, "full"), (1, "none", True, True, "full"),
    (1, "global", True, False, "full"), (0, "global", True, True, "partial"), (1, "none", True, True, "chain")]


@pytest.mark.parametrize("staleness,clip,device_ids,lag,mode", ZERO_COPY_CASES)
def test_zero_copy_equals_staged_cpu_engine_bitwise(staleness, clip, device_ids, lag, mode):
    """The device reads rows straight from the pinned, mapped bf16 mirror (no ids round trip, no CPU gather):
    the same values as the staged path, so the same training bitwise, also when the GPU lags behind."""
    script = make_script(40, seed=41 + staleness, mode=mode)
    kw = dict(staleness=staleness, clip=clip, max_norm=0.5)
    got = train("cuda", script, device_ids=device_ids, lag=lag, zero_copy=True, **kw)
    assert_same(got, train("cpu", script, **kw))
    for o in got:
        assert torch.equal(o.store.mirror, o.store.weights.to(torch.bfloat16))  # the update wrote both


@pytest.mark.parametrize("staleness", [0, 1])
def test_zero_copy_accumulation_equals_cpu_engine(staleness):
    """Two micro-batches, every layer in both: at staleness 1 the second fetch of a layer must read the
    mirror after the previous step's update has written it (the fetch waits for it)."""
    script = make_script(30, seed=6, accum=2, all_layers=True)
    kw = dict(staleness=staleness, clip="layer", max_norm=0.5)
    assert_same(train("cuda", script, lag=True, zero_copy=True, **kw), train("cpu", script, **kw))


def test_zero_copy_mirror_is_pinned_mapped_and_seen_by_the_device():
    """The mirror is page-locked at its exact size (counted by staging_bytes) and the device view reads
    the host bytes themselves: a host write is visible to the next kernel without any copy."""
    opts = make_opts()
    with offload.TransferScheduler(opts, device="cuda", max_rows=MAX_ROWS, zero_copy=True) as s:
        assert s.h2d_pool is None
        assert s.engine.pinned_bytes == offload.TransferScheduler.staging_bytes(
            N_LAYERS, MAX_ROWS, WIDTH, torch.bfloat16, zero_copy_rows=N_ROWS)
        assert all(o.store.mirror.is_pinned() for o in opts)
        assert not any(o.store.weights.is_pinned() for o in opts)
        view = s._mirrors_dev[1]
        assert view.device.type == "cuda" and view.data_ptr() == opts[1].store.mirror.data_ptr()
        opts[1].store.mirror[5].fill_(3.0)
        assert float(view[5].float().sum().cpu()) == 3.0 * WIDTH
        opts[1].store.refresh_mirror()
        s.begin_step()
        ids = torch.tensor([5, 9, 2, -1, -1], device="cuda")  # fixed-shape routing: 3 used slots
        h = s.fetch(1, ids)
        rows = h.wait()[:3].cpu()
        s.push_grads(1, h.ids_dev, torch.zeros(5, WIDTH, device="cuda"))
        s.finish_step()
        assert torch.equal(rows, opts[1].store.weights[[5, 9, 2]].to(torch.bfloat16))
        assert s.meter.report()["totals"]["h2d"]["rows"] == 3


# ------------------------------------------------------------------------------- step union (accumulation)
def test_step_union_with_host_ids_and_a_lagging_gpu_equals_cpu_engine():
    """Accumulation over three micro-batches, every layer in each, host ids, a GPU that lags: rows come from
    the device's step union by slot and gradients are summed there, crossing once. The union's own waits
    (slots H2D before a lookup, slots_host not rewritten before its copy ran) are defensive: on the H200 the
    same run with both removed (test hook "slots") still matched, because the ids copies of the same fetches
    already order them; this test holds the positive case."""
    script = make_script(20, seed=7, accum=3, all_layers=True)
    assert_same(train("cuda", script, lag=True, device_ids=False), train("cpu", script))
