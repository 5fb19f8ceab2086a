"""Fixtures shared by the offload tests."""

import numba
import pytest


@pytest.fixture
def one_numba_thread():
    """Tiny shapes: serial kernels (numba threads are per calling thread; the schedulers under test get
    host_threads=1). Parallel regions on an oversubscribed 2-core box cost a time slice each."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)
