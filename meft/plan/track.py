"""Peak-memory tracking of one training step: a MemTracker that copes with frozen parameters and
fused-backward optimizers, and the mapping of its categories onto the plan's breakdown.

Owns `StepTracker` (torch.distributed._tools.mem_tracker.MemTracker, whose module tracking installs a
gradient hook on *every* parameter -- which raises for frozen ones -- and assumes `.grad` still exists
after accumulation, which Lomo/AdaLomo free in their own hook) and `measure_step(step_fn, ...)`.
The same code measures fake CPU tensors (the plan) and real CPU tensors (the check the plan is tested
against), so the two differ only in what they run, never in how they count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

__all__ = ["StepTracker", "measure_step", "CATEGORIES"]

# plan breakdown key -> MemTracker category names summed into it
CATEGORIES = {
    "parameters": ("Parameter", "Buffer"),
    "gradients": ("Gradient",),
    "optimizer_state": ("Optstate",),
    "activations": ("Activation", "Temp"),
    "row_buffers": ("Other",),
}


class StepTracker(MemTracker):
    """MemTracker whose gradient hooks go only on parameters that require grad and tolerate a
    `.grad` already freed by a fused optimizer's post-accumulate hook."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        def post_hook(p: torch.Tensor) -> None:
            if p.grad is not None:  # Lomo/AdaLomo free it in their (earlier) hook
                grad_hook(p.grad)

        param_memory = buffer_memory = 0
        for param in module.parameters():
            winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_memory += sum(w.mem_consumed for w in winfos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook), param.register_post_accumulate_grad_hook(post_hook))
        for buffer in module.buffers():
            winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_memory += sum(w.mem_consumed for w in winfos)
        return param_memory, buffer_memory

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 - the parent's signature
        """Global peak only: the parent also scans every module's stats on every op (O(ops x modules),
        minutes for a 7B model); the plan never reads per-module peaks."""
        for dev, dev_snap in self._curr_mem_snap.items():
            total = dev_snap[_TOTAL_KEY]
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(dev_snap)

    def mark_optimizer_state(self, *tensors: torch.Tensor) -> None:
        """Count tensors (optimizer state made outside a torch.optim step hook) as optimizer state."""
        for t in tensors:
            self._update_and_maybe_create_winfos(t, _MemRefType.OPT)


def _breakdown(snap: dict) -> dict[str, int]:
    per_cat: dict[str, int] = {}
    for dev_snap in snap.values():
        for k, v in dev_snap.items():
            name = str(getattr(k, "value", k))
            per_cat[name] = per_cat.get(name, 0) + int(v)
    out = {key: sum(per_cat.get(c, 0) for c in cats) for key, cats in CATEGORIES.items()}
    out["total"] = per_cat.get("Total", 0)
    return out


def measure_step(step_fn: Callable[[StepTracker], None], modules=(), optimizers=(), buffers=()) -> dict:
    """Run `step_fn(tracker)` under a StepTracker; `modules` / `optimizers` / `buffers` (tensors that
    exist before the step: device row buffers) are tracked from the start.

    Returns {"peak": bytes, "at_peak": {category: bytes at the peak moment}}."""
    mt = StepTracker()
    mt.track_external(*modules, *optimizers, *buffers)
    with mt:
        step_fn(mt)
    peak = mt.get_tracker_snapshot("peak")
    at_peak = _breakdown(peak)
    return {"peak": at_peak.pop("total"), "at_peak": at_peak}
