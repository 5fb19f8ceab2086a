"""StepClock: the step / micro-batch structure every RowScheduler keeps, and its checks (defined once).

A step is opened by `begin_step(accum_steps)`, holds `accum_steps` micro-batches (the first begins
implicitly at the first fetch; `begin_micro_batch()` starts each next one) and is closed by
`finish_step()`. Both schedulers own one clock and read `step`, `micro_batch`, `accum_steps` from it.
"""

from __future__ import annotations

__all__ = ["StepClock", "check_layer"]


def check_layer(layer, n_layers: int) -> int:
    """A layer index of a scheduler with `n_layers` layers (one per optimizer)."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer!r} is out of range: this scheduler has {n_layers} layers "
                         f"(0..{n_layers - 1}), one per optimizer")
    return layer


class StepClock:
    """Counters of the current step (1-based, 0 before the first) and micro-batch (0-based; -1 until
    the step's first fetch), with the errors a caller gets for calls out of order."""

    def __init__(self):
        self.step, self.micro_batch, self.accum_steps, self.in_step = 0, -1, 1, False

    def begin_step(self, accum_steps: int) -> int:
        if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
            raise ValueError(f"accum_steps={accum_steps!r} must be an int >= 1 (micro-batches per step)")
        if self.in_step:
            raise ValueError(f"begin_step: step {self.step} was not finished; call finish_step() first")
        self.step += 1
        self.accum_steps, self.micro_batch, self.in_step = accum_steps, -1, True
        return self.step

    def begin_micro_batch(self) -> None:
        if not self.in_step:
            raise ValueError("begin_micro_batch: no step in progress; call begin_step() first")
        if self.micro_batch + 1 >= self.accum_steps:
            raise ValueError(f"begin_micro_batch: micro-batch {self.micro_batch + 1} would exceed "
                             f"accum_steps={self.accum_steps} given to begin_step")
        self.micro_batch += 1

    def check_in_step(self, what: str) -> None:
        if not self.in_step:
            raise ValueError(f"{what}: no step in progress; call begin_step() first")

    def need_step(self, what: str) -> tuple[int, int]:
        """(step, micro-batch) for a fetch / push; the step's first micro-batch begins here if not yet."""
        self.check_in_step(what)
        self.micro_batch = max(self.micro_batch, 0)
        return self.step, self.micro_batch

    def check_between_steps(self, what: str) -> None:
        if self.in_step:
            raise ValueError(f"{what}: a step is in progress; call it before begin_step()")

    def finish_step(self) -> None:
        self.check_in_step("finish_step")
        self.in_step = False

    @property
    def last_micro_batch(self) -> bool:
        """The current micro-batch is the step's last (its gradients complete the step's)."""
        return self.micro_batch == self.accum_steps - 1
