"""Device flags on CUDA: the compute stream, not the host, waits for a staged fetch's rows. Skipped without CUDA.

The rest of the CUDA scheduler tests (`tests/offload/test_cuda_paths.py`) run with flags on, the default,
and compare bitwise with the thread engine; here: the flags exist (stream memory operations work), a slow
host gather does not hold the host thread in `wait()`, and a failing gather releases the flags so neither
the host nor the device hangs.
"""

from __future__ import annotations

import time

import pytest
import torch

import offload
from tests.offload.test_cuda_paths import MAX_ROWS, make_opts

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]

GATHER_S = 0.05


def _slow(opts, fail_layer: int | None = None):
    for la, o in enumerate(opts):
        fast = o.store.gather

        def slow(ids, out, _fast=fast, _fail=la == fail_layer):
            time.sleep(GATHER_S)
            if _fail:
                raise RuntimeError("gather failed on purpose")
            return _fast(ids, out)

        o.store.gather = slow


def test_flags_exist_and_the_host_does_not_wait_for_the_gather():
    opts = make_opts()
    _slow(opts)
    with offload.TransferScheduler(opts, device="cuda", max_rows=MAX_ROWS, host_threads=1) as s:
        assert s.flags is not None, s.engine.flags_missing
        s.begin_step()
        t0 = time.perf_counter()
        handles = [s.fetch(la, torch.arange(5, dtype=torch.int64, device="cuda")) for la in range(len(opts))]
        sums = [h.wait().float().sum() for h in handles]  # queued on the compute stream behind the flags
        host_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        want = [o.store.weights[:5].to(torch.bfloat16).float().sum() for o in opts]
        assert [float(x) for x in sums] == [float(x) for x in want]
        for la, h in enumerate(handles):
            s.push_grads(la, h.ids_dev, torch.zeros(5, opts[0].store.width, device="cuda"))
        s.finish_step()
        assert s.meter.report()["overlap"]["worker_waits"] == 0
    assert host_s < GATHER_S * len(opts) / 2, f"host thread held {host_s * 1e3:.1f} ms in fetch + wait"


def test_a_failing_gather_releases_the_device():
    opts = make_opts()
    _slow(opts, fail_layer=1)
    s = offload.TransferScheduler(opts, device="cuda", max_rows=MAX_ROWS, host_threads=1)
    s.begin_step()
    handles = [s.fetch(la, torch.arange(5, dtype=torch.int64, device="cuda")) for la in range(len(opts))]
    handles[0].wait()
    with pytest.raises(RuntimeError, match="gather failed on purpose"):
        for h in handles[1:]:
            h.wait()
            time.sleep(2 * GATHER_S)
    t0 = time.perf_counter()
    torch.cuda.synchronize()  # every queued device wait was released
    assert time.perf_counter() - t0 < 5.0
    s.close()
