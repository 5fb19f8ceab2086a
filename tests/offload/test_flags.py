"""Device flags: a staged fetch's rows are awaited by the device, never by the caller waiting for the worker.

The plain twin is the same scheduler with `device_flags=False` (the caller waits for the gather, then for
the copy). Both must give bitwise the synchronous result; with flags the compute thread must never wait for
the host worker (`meter.report()["overlap"]["worker_waits"]`), a slow gather included; a worker error must
release the flags (no hang) and reach the caller; the wait is shown to matter in
`tests/offload/test_scheduler.py::test_disabled_wait_is_detected` (flags are the default there).
"""

import threading
import time

import pytest
import torch

from offload.engine import ThreadCopyEngine
from offload.flags import ThreadFlags, reached
from tests.offload.test_scheduler import check_equal_to_sync, make_opts, sched

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def test_cyclic_compare_survives_wraparound():
    assert reached(5, 5) and reached(6, 5) and not reached(4, 5)
    assert reached(1, 0xFFFFFFFF)  # the counter wrapped: 1 comes after 2**32 - 1
    assert not reached(0xFFFFFFFF, 1)


def test_signal_lands_behind_the_copies_queued_before_it():
    eng = ThreadCopyEngine(delay=lambda d, n: 0.05 if d == "h2d" else 0.0)
    flags = eng.alloc_flags(2)
    src, dst = torch.ones(4), torch.zeros(4)
    v = flags.next(1)
    eng.h2d(src, dst)
    flags.signal(1, v)
    flags.wait_device(1, v, lambda: None)
    assert torch.equal(dst, src)  # the flag was written after the copy, on the same queue
    assert flags.value(0) == 0 and flags.value(1) == v
    eng.close()


def test_release_all_ends_every_wait():
    flags = ThreadFlags(3, enqueue=lambda op: None)  # signals are never delivered
    values = [flags.next(i) for i in range(3)] + [flags.next(2)]
    done = threading.Event()

    def waiter():
        flags.wait_device(2, values[-1], lambda: None)
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not done.wait(0.1)
    flags.release_all()
    assert done.wait(5.0)
    assert [flags.value(i) for i in range(3)] == [1, 1, 2]


@pytest.mark.parametrize("device_flags", [True, False])
def test_random_steps_equal_sync_with_and_without_flags(device_flags):
    check_equal_to_sync(200, seed=21, staleness=0, clip="layer", device_flags=device_flags)


def _slow_gathers(opts, seconds: float):
    for o in opts:
        fast = o.store.gather

        def slow(ids, out, _fast=fast):
            time.sleep(seconds)  # the host worker is late: a lockstep would make the caller wait here
            return _fast(ids, out)

        o.store.gather = slow


@pytest.mark.parametrize("device_flags", [True, False])
def test_compute_thread_never_waits_for_the_worker(device_flags):
    """A forward over every layer with a slow gather: with flags the caller's waits are device waits only."""
    opts = make_opts(3)
    _slow_gathers(opts, 0.02)
    with sched(opts, device_flags=device_flags) as s:
        for _step in range(2):
            s.begin_step()
            handles = [s.fetch(la, torch.arange(4 + la, dtype=torch.int64)) for la in range(len(opts))]
            rows = [h.wait().clone() for h in handles]
            for la, (h, r) in enumerate(zip(handles, rows)):
                assert torch.equal(r.float(), opts[la].store.weights[: 4 + la].to(r.dtype).float())
                s.push_grads(la, h.ids_dev, torch.zeros_like(r))
            s.finish_step()
        ov = s.meter.report()["overlap"]
    if device_flags:
        assert ov["worker_waits"] == 0 and ov["worker_blocked_ms"] == 0.0
    else:
        assert ov["worker_waits"] == 2 * len(opts) and ov["worker_blocked_ms"] > 0.0


def test_worker_error_releases_flags_and_reaches_the_caller():
    opts = make_opts(4)

    def broken(ids, out):
        time.sleep(0.05)  # the caller reaches wait() first
        raise RuntimeError("gather failed on purpose")

    opts[1].store.gather = broken
    s = sched(opts)
    s.begin_step()
    h0 = s.fetch(0, torch.arange(3, dtype=torch.int64))
    h1 = s.fetch(1, torch.arange(3, dtype=torch.int64))
    h2 = s.fetch(2, torch.arange(3, dtype=torch.int64))  # queued behind the failing gather: never runs
    t0 = time.perf_counter()
    h0.wait()
    with pytest.raises(RuntimeError, match="gather failed on purpose"):
        h1.wait()
    with pytest.raises(RuntimeError, match="stopped after a worker error"):
        h2.wait()
    assert time.perf_counter() - t0 < 5.0
    assert s.flags.value(2) == h2.flag_value  # released: nothing waits for a gather that will not run
    s.close()
