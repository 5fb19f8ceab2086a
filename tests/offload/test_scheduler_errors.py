"""TransferScheduler at its edges: a worker's failure surfaces (with its own traceback) at the caller's next
call and never hangs shutdown, an unreported one is raised by close; misuse of the API (order of calls,
shapes, dtypes, options) raises a ValueError or TypeError that names it; a released handle frees its layer
for a new fetch. The bitwise equality with synchronous training is test_scheduler's.
"""

import time

import pytest
import torch

from offload.engine import ThreadCopyEngine
from offload.optim import SparseAdamW
from offload.scheduler import TransferScheduler
from offload.store import RowStore
from tests.offload.test_scheduler import MAX_ROWS, N_ROWS, WIDTH, WIRE, make_opts, sched

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


def test_worker_exception_surfaces_with_original_traceback():
    opts = [SparseAdamW(RowStore(N_ROWS, WIDTH))]
    s = sched(opts)
    s.begin_step()
    h = s.fetch(0, torch.tensor([1, N_ROWS + 5]))  # out of the store's range: fails on the worker
    with pytest.raises(ValueError, match="out of range") as info:
        h.wait()
    frames = [f.name for f in info.traceback]
    assert "gather" in frames and "_gather_task" in frames  # the worker's own frames
    with pytest.raises(RuntimeError, match="worker error"):
        s.begin_micro_batch()
    t0 = time.perf_counter()
    s.close()  # already reported: closes quietly
    assert time.perf_counter() - t0 < 5


class _FailingAdamW(SparseAdamW):
    def step(self, grad_scale: float = 1.0, *, hparams=None) -> bool:
        raise OSError("injected failure in the optimizer step")

    def step_rows(self, ids, grads, grad_scale: float = 1.0, *, hparams=None) -> bool:
        raise OSError("injected failure in the optimizer step (one pass from the staging slot)")


@pytest.mark.timeout(30)
def test_shutdown_after_error_does_not_hang():
    eng = ThreadCopyEngine(link_gbps=0.01)
    opts = [_FailingAdamW(RowStore(N_ROWS, WIDTH)) for _ in range(4)]
    s = sched(opts, engine=eng, n_slots=1)
    with pytest.raises(OSError, match="injected"):  # at the first call after the worker failed
        s.begin_step()
        hs = [s.fetch(la, torch.arange(8)) for la in range(4)]
        for la in reversed(range(4)):
            s.push_grads(la, hs[la].ids_dev, hs[la].wait().float())
            time.sleep(0.05)
        s.finish_step()
    t0 = time.perf_counter()
    s.close()
    eng.close()
    assert time.perf_counter() - t0 < 10
    assert not s.worker._thread.is_alive()


@pytest.mark.timeout(30)
def test_unreported_error_is_raised_by_close_and_context_manager():
    opts = [_FailingAdamW(RowStore(N_ROWS, WIDTH))]
    with pytest.raises(OSError, match="injected"):
        with sched(opts, staleness=1) as s:
            s.begin_step()
            h = s.fetch(0, torch.arange(4))
            s.push_grads(0, h.ids_dev, h.wait().float())
            s.finish_step()  # staleness 1: the failing step only runs at close (flush)


def test_input_validation():
    opts = make_opts()
    with sched(opts) as s:
        with pytest.raises(ValueError, match="begin_step"):
            s.fetch(0, torch.arange(3))
        s.begin_step(accum_steps=1)
        with pytest.raises(ValueError, match="layer=3 is out of range"):
            s.fetch(3, torch.arange(3))
        with pytest.raises(ValueError, match="max_rows"):
            s.fetch(0, torch.arange(MAX_ROWS + 1))
        with pytest.raises(TypeError, match="int64"):
            s.fetch(0, torch.arange(3, dtype=torch.int32))
        with pytest.raises(ValueError, match="no live fetch"):
            s.push_grads(1, torch.arange(3), torch.zeros(3, WIDTH))
        h = s.fetch(0, torch.arange(3))
        with pytest.raises(ValueError, match="already fetched"):
            s.fetch(0, torch.arange(3))
        with pytest.raises(ValueError, match=r"expected \(3, 8\)"):
            s.push_grads(0, h.ids_dev, torch.zeros(4, WIDTH))
        with pytest.raises(ValueError, match="differ"):
            s.push_grads(0, torch.tensor([0, 1, 5]), torch.zeros(3, WIDTH))
        with pytest.raises(ValueError, match="accum_steps"):
            s.begin_micro_batch()
        s.push_grads(0, h.ids_dev, torch.zeros(3, WIDTH))
        with pytest.raises(ValueError, match="no longer valid"):
            h.wait()
        with pytest.raises(ValueError, match="last-micro-batch"):
            s.fetch(0, torch.arange(3))
        s.finish_step()
    for kw, msg in [({"max_rows": 0}, "max_rows"), ({"staleness": 2}, "staleness"),
                    ({"clip": "norm"}, "clip"), ({"n_slots": 0}, "n_slots"),
                    ({"wire_dtype": torch.float16}, "wire_dtype"), ({"host_threads": 0}, "host_threads")]:
        with pytest.raises(ValueError, match=msg):
            TransferScheduler(opts, **{"max_rows": 4, **kw})


def test_release_allows_refetch_and_empty_fetch():
    opts = make_opts()
    with sched(opts) as s:
        s.begin_step()
        h = s.fetch(1, torch.tensor([2, 5]))
        torch.testing.assert_close(h.wait(), opts[1].store.weights[[2, 5]].to(WIRE))
        h.release()
        h2 = s.fetch(1, torch.empty(0, dtype=torch.int64))
        assert h2.wait().shape == (0, WIDTH)
        s.push_grads(1, h2.ids_dev, torch.zeros(0, WIDTH))
        s.finish_step()
