"""offload.steps: the step / micro-batch clock both schedulers keep, and its errors."""

import pytest

from offload.steps import StepClock, check_layer


def test_clock_counts_steps_and_micro_batches():
    c = StepClock()
    assert c.begin_step(2) == 1 and c.micro_batch == -1
    assert c.need_step("fetch") == (1, 0) and not c.last_micro_batch  # first micro-batch begins implicitly
    c.begin_micro_batch()
    assert c.need_step("push_grads") == (1, 1) and c.last_micro_batch
    c.finish_step()
    assert c.begin_step(1) == 2 and c.micro_batch == -1


def test_clock_refuses_calls_out_of_order():
    c = StepClock()
    with pytest.raises(ValueError, match="fetch: no step in progress; call begin_step"):
        c.need_step("fetch")
    with pytest.raises(ValueError, match="finish_step: no step in progress"):
        c.finish_step()
    with pytest.raises(ValueError, match="accum_steps=0 must be an int >= 1"):
        c.begin_step(0)
    c.begin_step(1)
    with pytest.raises(ValueError, match="step 1 was not finished"):
        c.begin_step(1)
    c.need_step("fetch")  # micro-batch 0 begins implicitly
    with pytest.raises(ValueError, match="micro-batch 1 would exceed accum_steps=1"):
        c.begin_micro_batch()
    with pytest.raises(ValueError, match="reserve_live_rows: a step is in progress"):
        c.check_between_steps("reserve_live_rows")


def test_check_layer():
    assert check_layer(1, 2) == 1
    for bad in (2, -1, True, "0"):
        with pytest.raises(ValueError, match="out of range: this scheduler has 2 layers"):
            check_layer(bad, 2)
