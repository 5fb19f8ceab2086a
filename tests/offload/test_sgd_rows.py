"""Row SGD (`SparseAdamW(rule="sgd")`, `offload.sgd_kernel`): the fused kernel against its plain twin and
torch.optim.SGD, the moments left alone, masks and mirrors as AdamW's, and the scheduler's asynchronous
training equal to the synchronous definition with this rule."""

import numpy as np
import pytest
import torch

from offload.engine import ThreadCopyEngine
from offload.kernels import as_numpy
from offload.optim import SparseAdamW
from offload.sgd_kernel import reference_sgd_rows, sgd_rows
from offload.store import RowStore
from tests.offload.test_scheduler import (
    N_LAYERS,
    N_ROWS,
    WIDTH,
    make_script,
    random_delay,
    run_async,
    run_sync,
    sched,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")  # tests/offload/conftest.py


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_equals_the_plain_twin(grad_dtype, masked):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 8, generator=g)
    steps = torch.zeros(20, dtype=torch.int64)
    ids = torch.tensor([3, 0, 17, 9, 5])
    grads = torch.randn(5, 8, generator=g).to(grad_dtype)
    keep = torch.tensor([True, False, True, True, False]) if masked else None
    mirror = torch.zeros(20, 8, dtype=torch.bfloat16)
    w_ref, steps_ref = w.clone(), steps.clone()
    sgd_rows(w.numpy(), steps.numpy(), ids.numpy(), as_numpy(grads), 0.5, 0.1, 0.01, as_numpy(mirror),
             None if keep is None else keep.numpy())
    reference_sgd_rows(w_ref, steps_ref, ids, grads.float() * 0.5, lr=0.1, weight_decay=0.01, keep=keep)
    assert torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7) and torch.equal(steps, steps_ref)
    touched = ids if keep is None else ids[keep]
    assert torch.equal(mirror[touched], w[touched].to(torch.bfloat16))  # the mirror row written in the same pass
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(mirror[untouched], torch.zeros_like(mirror[untouched]))


def test_every_row_every_step_equals_torch_sgd():
    g = torch.Generator().manual_seed(2)
    init = torch.randn(16, 8, generator=g)
    opt = SparseAdamW(RowStore(16, 8, init=init), lr=0.05, weight_decay=0.1, rule="sgd")
    p = torch.nn.Parameter(init.clone())
    ref = torch.optim.SGD([p], lr=0.05, weight_decay=0.1)  # coupled decay: equal to decoupled without momentum
    for _ in range(5):
        grads = torch.randn(16, 8, generator=g)
        opt.accumulate(torch.arange(16), grads)
        assert opt.step()
        p.grad = grads.clone()
        ref.step()
    assert torch.allclose(opt.store.weights, p.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(opt.store.exp_avg, torch.zeros_like(opt.store.exp_avg))  # SGD keeps no moments
    assert torch.equal(opt.store.steps, torch.full((16,), 5))


def test_rule_is_checked_and_kept_in_the_state():
    with pytest.raises(ValueError, match=r"rule='adam' must be one of 'adamw', 'sgd'"):
        SparseAdamW(RowStore(4, 2), rule="adam")
    sd = SparseAdamW(RowStore(4, 2), rule="sgd").state_dict()
    assert sd["rule"] == "sgd"
    with pytest.raises(ValueError, match="saved by a rule='sgd' optimizer"):
        SparseAdamW(RowStore(4, 2)).load_state_dict(sd)


def test_scheduler_with_sgd_rows_equals_the_synchronous_definition():
    def opts(seed):
        g = torch.Generator().manual_seed(seed)
        return [SparseAdamW(RowStore(N_ROWS, WIDTH, init=torch.randn(N_ROWS, WIDTH, generator=g)), lr=3e-2,
                            weight_decay=0.01, rule="sgd") for _ in range(N_LAYERS)]

    script = make_script(80, 5)
    ref, got = opts(5), opts(5)
    run_sync(ref, script, staleness=0, clip="layer")
    eng = ThreadCopyEngine(delay=random_delay(5))
    with sched(got, engine=eng, clip="layer") as s:
        run_async(s, script)
    eng.close()
    for a, b in zip(ref, got):
        assert torch.equal(a.store.weights, b.store.weights)
        assert np.array_equal(a.store.steps.numpy(), b.store.steps.numpy())
