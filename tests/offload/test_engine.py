"""Copy engines: the thread engine for real (threads, events, simulated link, delay injector);
the CUDA engine only where CUDA exists."""

import threading
import time

import pytest
import torch

from offload.engine import CudaCopyEngine, ThreadCopyEngine, cuda_available, make_engine

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture
def eng():
    e = ThreadCopyEngine()
    yield e
    e.close()


def test_thread_copies_land_and_events_fire(eng):
    src = torch.randn(64, 32)
    dst = torch.zeros(64, 32, dtype=torch.bfloat16)
    seen = []
    ev = eng.h2d(src, dst, rows=64, on_done=lambda e: seen.append((e.query(), threading.current_thread().name)))
    ev.wait()
    assert ev.query() and torch.equal(dst, src.to(torch.bfloat16))
    assert ev.nbytes == src.nbytes and ev.rows == 64 and ev.start_s <= ev.end_s
    for _ in range(100):
        if seen:
            break
        time.sleep(0.01)
    assert seen == [(True, "meft-copy-h2d")]  # on_done: after completion, on the engine thread


def test_copies_of_one_direction_run_in_order():
    eng = ThreadCopyEngine(delay=lambda d, n: 1e-3)
    dst = torch.zeros(1)
    evs = [eng.d2h(torch.full((1,), float(i)), dst) for i in range(20)]
    evs[-1].wait()
    assert all(e.query() for e in evs) and float(dst) == 19.0
    assert all(a.end_s <= b.start_s for a, b in zip(evs, evs[1:]))
    eng.close()


def test_wait_is_needed_delay_injector_makes_it_observable():
    eng = ThreadCopyEngine(delay=lambda d, n: 0.05)
    dst = torch.zeros(4)
    ev = eng.h2d(torch.ones(4), dst)
    assert not ev.query() and float(dst.sum()) == 0.0  # not landed yet: a reader that skips wait() is wrong
    ev.wait()
    assert float(dst.sum()) == 4.0
    eng.close()


def test_simulated_link_duration_and_full_duplex():
    eng = ThreadCopyEngine(link_gbps=0.002, latency_us=1000)  # 2 MB/s: 100 kB take 50 ms (+1 ms latency)
    a, b = torch.ones(25_000), torch.zeros(25_000)  # 100 kB
    t0 = time.perf_counter()
    e1 = eng.h2d(a, b)
    e2 = eng.d2h(a, torch.zeros(25_000))
    e1.wait()
    e2.wait()
    took = time.perf_counter() - t0
    assert e1.end_s - e1.start_s >= 0.051 - 1e-4
    assert took < 0.051 * 1.6  # the two directions overlap (one worker each)
    eng.close()


def test_copy_error_reaches_waiter_and_callback_still_runs():
    def bad_delay(direction, nbytes):
        raise OSError("link down")

    eng = ThreadCopyEngine(delay=bad_delay)
    called = threading.Event()
    ev = eng.h2d(torch.ones(2), torch.zeros(2), on_done=lambda e: called.set())
    with pytest.raises(OSError, match="link down"):
        ev.wait()
    assert called.wait(2)
    ev2 = eng.h2d(torch.ones(2), torch.zeros(2))  # the engine thread survived
    with pytest.raises(OSError):
        ev2.wait()
    eng.close()


def test_validation_and_close(eng):
    with pytest.raises(ValueError, match="shape"):
        eng.h2d(torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match="link_gbps"):
        ThreadCopyEngine(link_gbps=0)
    with pytest.raises(ValueError, match="latency_us"):
        ThreadCopyEngine(latency_us=-1)
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        eng.h2d(torch.ones(1), torch.zeros(1))


def test_make_engine():
    e = make_engine("cpu")
    assert isinstance(e, ThreadCopyEngine) and not e.pinned and e.mark_compute() is None
    e.close()
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda"):
        make_engine("meta")


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_engine_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CudaCopyEngine()
    assert not torch.cuda.is_initialized()


@needs_cuda
@pytest.mark.cuda
def test_cuda_engine_round_trip_pinned_and_ordered():
    eng = CudaCopyEngine()
    host = eng.alloc_host((256, 64), torch.bfloat16)
    assert host.is_pinned()
    host.copy_(torch.randn(256, 64))
    dev = eng.alloc_device((256, 64), torch.bfloat16)
    back = eng.alloc_host((256, 64), torch.bfloat16)
    e1 = eng.h2d(host, dev, after=eng.mark_compute())
    e1.wait_device()
    dev.mul_(2)  # compute stream, after the H2D
    e2 = eng.d2h(dev, back, after=eng.mark_compute())
    e2.wait()
    assert torch.equal(back, host * 2) and not e1.pageable and not e2.pageable
    assert e2.start_s >= e1.end_s - 1e-3
    eng.close()


@needs_cuda
@pytest.mark.cuda
def test_cuda_scheduler_matches_thread_scheduler():
    from offload.optim import SparseAdamW
    from offload.scheduler import TransferScheduler
    from offload.store import RowStore

    def train(device):
        g = torch.Generator().manual_seed(0)
        opts = [SparseAdamW(RowStore(128, 16, init=torch.randn(128, 16, generator=g)), lr=1e-2)
                for _ in range(2)]
        with TransferScheduler(opts, device=device, max_rows=32) as s:
            for t in range(20):
                s.begin_step()
                ids = torch.randperm(128, generator=g)[:32].sort().values.to(device)
                hs = [s.fetch(la, ids) for la in range(2)]
                for la in (1, 0):
                    s.push_grads(la, hs[la].ids_dev, hs[la].wait().float() * 0.5 + t)
                s.finish_step()
            assert s.meter.report()["pageable_copies"] == 0
        return [o.store.weights.clone() for o in opts]

    for a, b in zip(train("cpu"), train("cuda")):
        assert torch.equal(a, b)
