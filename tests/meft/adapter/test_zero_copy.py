"""`MeftConfig.fetch_mode="zero_copy"` on a real wrapped model: the same training as the staged path.

The rows the adapter receives are the wire-dtype mirror's (device reads; on this CPU the thread engine's
index_select twin) instead of a CPU gather into staging: bitwise the same values, so losses, rows and
router gates must match the staged run exactly, with accumulation and at staleness 1 too.
"""

import pytest
import torch

import meft
from tests.meft.adapter.test_wrap import adapter_state, batch, small_config, tiny_model, train


@pytest.mark.parametrize("wire,staleness,accum", [("bfloat16", 0, 1), ("bfloat16", 1, 2), ("float32", 0, 2)])
def test_zero_copy_training_equals_staged(wire, staleness, accum):
    ids = batch(4, 10)
    runs = {}
    for mode in ("staged", "zero_copy"):
        cfg = small_config(fetch_mode=mode, wire_dtype=wire, staleness=staleness, grad_accum_steps=accum)
        model = meft.wrap(tiny_model("llama"), cfg)
        assert model.meft.scheduler.zero_copy == (mode == "zero_copy")
        losses = train(model, ids, 8, accum=accum)
        runs[mode] = (losses, adapter_state(model))
        if mode == "zero_copy":
            for store in model.meft.stores:  # the mirror follows the master rows
                assert torch.equal(store.mirror, store.weights.to(store.mirror.dtype))
        model.meft.close()
    (l_st, w_st), (l_zc, w_zc) = runs["staged"], runs["zero_copy"]
    assert l_st[-1] < l_st[0]
    assert l_zc == l_st
    for a, b in zip(w_zc, w_st):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fetch_mode_is_validated():
    with pytest.raises(ValueError, match="fetch_mode = 'mapped'"):
        small_config(fetch_mode="mapped").validate()
