"""MeftCallback: train a wrapped model with HuggingFace `transformers.Trainer`.

Owns the glue between a `meft.wrap`-ped model and `Trainer`. The runtime already makes a plain
PyTorch loop correct (a step opens at the first training forward, row gradients leave for the host
during backward, `model.meft.optimizer.step()` finishes the step), so Trainer needs only three things,
which `MeftCallback` checks or does:

* Trainer must drive `model.meft.optimizer` (pass `optimizers=(model.meft.optimizer, None)`); any
  `lr_scheduler_type` then schedules the adapter rows and the router gates together;
* `TrainingArguments.gradient_accumulation_steps` must equal `MeftConfig.grad_accum_steps`, and
  `max_grad_norm` must be 0: Trainer's clipping would see only the router gates (row gradients have
  already left the device by then), so clipping is `MeftConfig.clip` / `max_norm`;
* the backbone must be frozen: Lomo / AdaLomo update it inside backward through
  `model.meft.backbone_optimizer.backward(loss)`, which Trainer does not call (use `meft train`).

It also adds the meft scalars per optimizer step (`meft/mb_down`, `meft/mb_up`, `meft/rows_down`,
`meft/rows_up`, `meft/cpu_update_ms`, averaged since the previous log, and the routing of the latest
micro-batch: `meft/distinct_experts`, `meft/dropped_share`) to each training log: to `state.log_history`
and to the `logs` that the printer / progress bar (which run after user callbacks) show. Trainer's own
`report_to` integrations run *before* user callbacks, so they never see these; `report_to=` here
("tensorboard", "wandb", a list or "a,b"; `meft.train.tracking`) writes them: TensorBoard event files
into `output_dir/tensorboard` (`tensorboard --logdir output_dir` shows them beside Trainer's `runs/`),
and wandb into the active run (Trainer's, when its `report_to` has wandb) or an offline one. For a
backend that Trainer's `report_to` does not also name, `train/loss` and `train/lr` are written too.
At every Trainer save it writes the
adapter (host rows + router gates + config, `meft.save_adapter`'s format) atomically into
`checkpoint-N/meft_adapter`; `meft.load_adapter` reads it back. Trainer's own `model.safetensors`
holds the backbone under the wrapped module names and no host rows. Resuming through
`Trainer(resume_from_checkpoint=...)` is not supported (untested); `meft train --resume` is.

    model = meft.wrap(model, MeftConfig(...))
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0), train_dataset=ds,
                      optimizers=(model.meft.optimizer, None), callbacks=[MeftCallback()])
    trainer.train()

The locality term (`MeftConfig.locality_weight`, `meft.adapter.locality`) is part of the loss, which Trainer
takes from the model; `locality_loss` is the `compute_loss` that adds it. The batches carry
`background_weight` (a float per token, [B, T]: `meft.data.locality.padded_background_weight` of the
background rows, which have labels -100), and `TrainingArguments(remove_unused_columns=False)` lets it
reach `compute_loss`; `meft/locality` (the latest micro-batch's term) then joins the logged scalars:

    class LocalityTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            return locality_loss(model, inputs, return_outputs=return_outputs)
"""

from __future__ import annotations

import os

from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback

from meft.adapter.saving import save_adapter
from meft.atomic import atomic_folder
from meft.train.tracking import Tracker, open_tracker, parse_report_to, step_traffic

__all__ = ["MeftCallback", "ADAPTER_DIR", "locality_loss"]

ADAPTER_DIR = "meft_adapter"  # inside each Trainer checkpoint-N folder


def _base_optimizer(opt):
    """The optimizer under accelerate's wrapper (Trainer wraps the one it was given in an
    `accelerate.optimizer.AcceleratedOptimizer`, which keeps it as `.optimizer`)."""
    while isinstance(opt, AcceleratedOptimizer):
        opt = opt.optimizer
    return opt


def locality_loss(model, inputs: dict, *, return_outputs: bool = False):
    """`Trainer.compute_loss` with the locality term: pops `background_weight` ([B, T] float, or absent: no
    term) from `inputs`, sets it on `model.meft.locality`, runs the model and returns its loss +
    `MeftConfig.locality_weight` x the term (and the outputs with `return_outputs`)."""
    rt = model.meft
    rt.locality.set_weight(inputs.pop("background_weight", None))
    outputs = model(**inputs)
    loss, _ = rt.locality.with_term(outputs.loss, rt.config.locality_weight)
    return (loss, outputs) if return_outputs else loss


class MeftCallback(TrainerCallback):
    """See the module docstring. `save_adapter=False` skips writing the adapter at Trainer saves;
    `report_to` ("none", "tensorboard", "wandb", several as a list or comma-separated) writes the meft
    scalars to those trackers."""
    def __init__(self, *, save_adapter: bool = True, report_to=None):
        self.save_adapter = save_adapter
        self.report_to = parse_report_to(report_to)
        self._last: dict = {}  # traffic totals (`step_traffic`) at the previous log
        self._last_step = 0
        self._trackers: list[tuple[Tracker, bool]] = []  # (tracker, also log Trainer's loss/lr)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        rt = getattr(model, "meft", None)
        if rt is None:
            raise ValueError("MeftCallback: the Trainer's model is not wrapped (no model.meft); call "
                             "meft.wrap(model, MeftConfig(...)) before building the Trainer")
        if optimizer is None or _base_optimizer(optimizer) is not rt.optimizer:
            raise ValueError(
                f"MeftCallback: Trainer built its own optimizer ({type(_base_optimizer(optimizer)).__name__}), "
                f"which never updates the host rows; pass optimizers=(model.meft.optimizer, None) to Trainer")
        k = rt.config.grad_accum_steps
        if args.gradient_accumulation_steps != k:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} but "
                f"MeftConfig.grad_accum_steps={k}: set both to the same number of micro-batches per step")
        if args.max_grad_norm:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} would clip only the router gates "
                f"(row gradients are already on the host): set max_grad_norm=0 and clip with "
                f"MeftConfig(clip='global', max_norm={args.max_grad_norm})")
        if rt.backbone_optimizer is not None:
            raise ValueError(
                f"MeftConfig.backbone={rt.config.backbone!r} updates the backbone inside backward through "
                f"model.meft.backbone_optimizer.backward(loss), which Trainer does not call: use "
                f"backbone='frozen' with Trainer, or `meft train` / a plain loop for Lomo / AdaLomo")
        self._last, self._last_step = step_traffic(rt), state.global_step
        self._open_trackers(args, rt)

    def _open_trackers(self, args, rt) -> None:
        if not self.report_to or self._trackers or not getattr(args, "should_log", True):
            return
        theirs = set(parse_report_to([r for r in (args.report_to or []) if r in ("tensorboard", "wandb")]))
        config = {"meft": rt.config.to_dict()}
        for names, full in (([n for n in self.report_to if n not in theirs], True),
                            ([n for n in self.report_to if n in theirs], False)):
            if names:
                self._trackers.append((open_tracker(names, args.output_dir, config), full))

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        rt = getattr(model, "meft", None)
        if rt is None or rt.meter is None or logs is None or "loss" not in logs:  # training logs only
            return
        now, steps = step_traffic(rt), max(1, state.global_step - self._last_step)
        d = {k: (now[k] - self._last[k]) / steps for k in now}
        extra = {"meft/mb_down": round(d["bytes_down"] / 1e6, 3), "meft/mb_up": round(d["bytes_up"] / 1e6, 3),
                 "meft/rows_down": round(d["rows_down"], 1), "meft/rows_up": round(d["rows_up"], 1),
                 "meft/cpu_update_ms": round(d["cpu_ms"], 3),
                 **{f"meft/{k}": round(v, 4) for k, v in rt.routing_stats().items()}}
        if rt.locality.last is not None:  # the locality term of the latest micro-batch (`locality_loss`)
            extra["meft/locality"] = round(float(rt.locality.last), 6)
        logs.update(extra)  # seen by the callbacks after this one (printer, progress bar)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # Trainer appended its copy before calling on_log
        self._last, self._last_step = now, state.global_step
        train = {"train/loss": logs["loss"], "train/lr": logs.get("learning_rate")}
        for tracker, full in self._trackers:
            tracker.log({**extra, **(train if full else {})}, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_adapter or getattr(model, "meft", None) is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ADAPTER_DIR)
        with atomic_folder(folder) as tmp:
            save_adapter(model, str(tmp), verbose=False)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rt = getattr(model, "meft", None)
        if rt is not None:
            rt.sync_to_host()  # staleness-1 updates applied: the host rows are the trained ones
        for tracker, _ in self._trackers:
            tracker.close()
        self._trackers = []
