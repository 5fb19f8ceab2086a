"""host_threads: sized so that the main thread plus the host worker's kernel team fit the cores, and honoured
for every kernel the worker runs (numba's thread count is per calling thread; the kernels used to reset it)."""

import threading

import numba
import pytest
import torch

from offload.kernels import PARALLEL_MIN_BYTES, get_num_threads, threads_for
from offload.worker import cores_available, thread_plan
from tests.offload.test_scheduler import make_opts, sched


def test_default_plan_fits_the_cores():
    plan = thread_plan(None, engine="thread", device="cpu")
    cores = cores_available()
    assert plan["host_threads"] == max(1, min(numba.config.NUMBA_NUM_THREADS, cores - 1))
    assert plan["busy"] == 1 + plan["host_threads"]
    assert plan["fits"] == (plan["busy"] <= cores)
    if cores >= 2:
        assert plan["fits"]


def test_bad_host_threads_names_the_field_and_the_range():
    with pytest.raises(ValueError, match=r"host_threads=0 must be an int in \[1, "):
        thread_plan(0, engine="thread", device="cpu")


def _seen_on_worker(s) -> int:
    """Threads a large kernel call would use, asked on the scheduler's host worker."""
    seen, done = [], threading.Event()
    s.worker.submit(lambda: (seen.append(threads_for(PARALLEL_MIN_BYTES)), done.set()))
    assert done.wait(10.0)
    return seen[0]


@pytest.mark.parametrize("n", sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}))
def test_host_threads_is_honoured_on_the_worker(n):
    main_before = get_num_threads()
    with sched(make_opts(2), host_threads=n) as s:
        assert s.thread_plan["host_threads"] == n
        assert _seen_on_worker(s) == n
        s.begin_step()
        h = s.fetch(0, torch.arange(4, dtype=torch.int64))
        s.push_grads(0, h.ids_dev, torch.ones_like(h.wait()))
        s.finish_step()
        assert _seen_on_worker(s) == n  # still n after the worker ran kernels
    assert get_num_threads() == main_before  # the caller's own setting is untouched
