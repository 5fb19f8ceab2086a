"""The training loop behind `meft train`: a plain PyTorch loop around a wrapped model.

Owns: loading model + data for a run, evaluation before/after, the step loop (micro-batches,
optimizer steps, learning-rate schedule, the locality term's background questions), per-step metrics (LM loss,
`locality` term, lr, tokens/s, rows and bytes moved each way, CPU update time, routing) into a progress bar,
`metrics.jsonl` and the `--report-to` trackers (`meft.train.tracking`), resumable checkpoints
(`meft.train.checkpoint`; resuming on another number of ranks reshards; which one and whether the options
match: `meft.train.resume`), the run folder's ownership (`meft.train.run_folder`: lock, no overwrite),
Ctrl-C and SIGTERM (finish the step, save, exit with 130 / 143), a rank of a torchrun run that dies
(`meft.train.distributed`: the others stop loudly), and the end-of-run summary table and loss plot.
Everything model-specific lives in `meft.adapter.wrap` / `meft.adapter.runtime`.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

import meft
from meft.adapter.saving import save_adapter
from meft.adapter.targets import check_layer_choice
from meft.atomic import atomic_write_text
from meft.config import MeftConfig, parse_backbone_dtype
from meft.data.locality import BackgroundQuestions, padded_background_weight
from meft.data.packed import check_packing_mode, pack_batch, resolve_packing
from meft.data.records import IGNORE_INDEX
from meft.data.replay import REPLAY_FORMS, replay_prompts
from meft.data.sources import RunData, load_run_data
from meft.evaluate import qa_accuracy
from meft.pretrained import enable_checkpointing, load_model
from meft.train.args import LR_SCHEDULES, TrainArgs
from meft.train.checkpoint import CheckpointError, load_training_state, save_training_state
from meft.train.distributed import Ranks
from meft.train.loss import step_loss
from meft.train.replay import self_replay_records
from meft.train.resume import ResumeError, completed_run, defining_options, plan_resume
from meft.train.run_args import check_train_args
from meft.train.run_folder import claim_run_folder
from meft.train.run_log import MetricsLog, plot_loss_curve
from meft.train.run_summary import run_summary, summary_table
from meft.train.tracking import open_tracker, parse_report_to, step_traffic

__all__ = ["train", "train_step", "lay_out", "setup_run", "lr_lambda", "locality_background"]


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at scheduler step s (0-based): linear warm-up, then the schedule."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: choose one of {LR_SCHEDULES}")

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        frac = (s - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if schedule == "linear":
            return max(0.0, 1 - frac)
        return 1.0

    return f


class _StopFlag:
    """First Ctrl-C or SIGTERM: finish the current step, save, exit with 128 + the signal (130 / 143).
    The same signal again: stop at once. Under torchrun a SIGTERM that ends the survivors of a failed rank
    exits at once instead (`Ranks.exit_if_peer_failed`): no collective could complete a save."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ranks: Ranks | None = None):
        self.requested = False
        self.signum: int | None = None
        self._ranks = ranks
        self._old: dict = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGTERM and self._ranks is not None:
            self._ranks.exit_if_peer_failed(signum)
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nmeft: {name}: finishing this step, saving a checkpoint, then stopping "
              f"({name} again to stop at once)", flush=True)

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: keep the default behaviour
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def _evaluate(model, tokenizer, data: RunData, args: TrainArgs, label: str) -> dict:
    out = {}
    for split, records in data.eval_splits.items():
        res = qa_accuracy(model, tokenizer, records, batch_size=args.eval_batch_size,
                          max_new_tokens=args.max_new_tokens, progress=args.progress)
        out[split] = {"exact_match": res["exact_match"], "contains": res["contains"], "n": res["n"],
                      "examples": res["items"][:5]}
        print(f"meft: {label} {split}: exact match {res['exact_match']:.1%}, contains "
              f"{res['contains']:.1%} (n={res['n']})", flush=True)
    return out


def lay_out(model, batch: dict, pack: bool) -> dict:
    """A micro-batch as the step computes it: its packed layout (`meft.data.packed`) where `pack` and it
    packs, else as given. A batch with locality background rows (`background` [B] bool,
    `meft.data.locality.with_background`) comes back with their per-token `background_weight` instead."""
    window = getattr(model.config, "sliding_window", None)  # the packed mask has none: examples must fit in one
    if pack and not (window and batch["input_ids"].shape[1] > window):
        packed = pack_batch(batch, dtype=model.get_input_embeddings().weight.dtype)  # mask dtype = scores'
        if packed is not None:
            return packed
    if "background" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "background"}
    out["background_weight"] = padded_background_weight(batch["attention_mask"], batch["background"])  # [B, T]
    return out


def train_step(model, rt, batches, accum: int, *, pack: bool = False, locality_weight: float = 0.0,
               stats: dict | None = None) -> tuple[float, int]:
    """Run `accum` micro-batches and the optimizer step; returns (mean language-model loss, labelled tokens).
    `pack`: each micro-batch runs in its packed layout (`meft.data.packed`: no padding, the shared prompt
    prefix once) where it packs; the same loss and gradients as its padded layout.
    A micro-batch with locality background rows (`meft.data.locality`) sets its per-token weight on the
    runtime (`model.meft.locality`) and backpropagates LM loss + `locality_weight` x the locality term;
    `stats["locality"]` then receives the term's mean over the micro-batches."""
    loss_sum, tokens, local_sum = 0.0, 0, None
    device = rt.device
    for batch in batches:
        batch = {k: v.to(device) for k, v in lay_out(model, batch, pack).items()}
        weight = batch.pop("background_weight", None)  # [B, T] / [1, L] fp32, or None
        rt.locality.set_weight(weight)
        lm = step_loss(model, batch, rt.backbone_optimizer)
        loss, local = rt.locality.with_term(lm, locality_weight)
        loss = loss / accum
        if rt.backbone_optimizer is not None:
            rt.backbone_optimizer.backward(loss)  # the fused update sees the full loss, term included
        else:
            loss.backward()
        loss_sum += float(lm.detach() / accum)
        if local is not None:
            local_sum = (local_sum or 0.0) + float(local) / accum
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    if stats is not None and local_sum is not None:
        stats["locality"] = local_sum
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    if rt.backbone_optimizer is not None:
        rt.backbone_optimizer.step()
    return loss_sum, tokens


def setup_run(args: TrainArgs, cfg: MeftConfig):
    """(meft, model, tokenizer, run data) for a run: device and dtype resolved, model loaded, data built."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    dtype = parse_backbone_dtype("--dtype", args.dtype)
    torch.manual_seed(cfg.seed)
    if not args.progress:  # transformers' own bars (loading, converting and writing weights) follow --progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    data = load_run_data(args, tokenizer, seed=cfg.seed)
    if args.replay:  # the untrained model answers: asked once here, before any adapter exists
        prompts = replay_prompts(args.replay, exclude=data.train_subjects, seed=cfg.seed)
        replayed = self_replay_records(model, tokenizer, prompts, system_prompt=data.system_prompt,
                                       batch_size=args.eval_batch_size, form=args.replay_form)
        data = load_run_data(args, tokenizer, seed=cfg.seed, extra_records=replayed)
        example = f", e.g. {replayed[0]['prompt']!r} -> {replayed[0]['completion']!r}" if replayed else ""
        print(f"meft: replay: {len(replayed)} answers of the base model join the training data{example}", flush=True)
    print(data.description, flush=True)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    return meft, model, tokenizer, data


def train(args: TrainArgs, cfg: MeftConfig, *, probe=None) -> dict:
    """Run one fine-tune as described by `args` and `cfg`; returns the summary dict (also saved).
    `probe(model, tokenizer) -> dict`: called on the trained model of a completed run (rank 0, after scoring,
    before the model is released); its result is the summary's ``trade_off`` entry (`meft train` passes
    the trade-off probe)."""
    cfg.validate()
    check_train_args(args)  # numbers and the device, before anything loads
    parse_report_to(args.report_to)  # a bad value fails before the model loads
    check_packing_mode(args.packing)
    if args.replay_form not in REPLAY_FORMS:  # before the model loads
        raise ValueError(f"--replay-form {args.replay_form!r}: choose one of {', '.join(REPLAY_FORMS)}")
    _check_backbone_accumulation(cfg)
    # torchrun: data parallel, rank 0 writes, a dead rank stops the others loudly (meft.train.distributed)
    ranks = Ranks(args.batch_size, args.device, output_dir=args.output_dir)
    lock = None
    try:
        if ranks.main:  # the run folder is rank 0's: refuse another run's folder, lock it, clear orphan temps
            lock = claim_run_folder(args.output_dir, resume=args.resume, overwrite=args.overwrite)
        options = defining_options(args, cfg)
        candidates = plan_resume(args.output_dir, options, verbose=ranks.main) if args.resume else []
        return _train(args, cfg, ranks, probe, candidates, options)
    except BaseException as exc:
        err = ranks.failed(exc)  # tells the other ranks; names a dead peer behind a failed collective
        if err is exc:
            raise
        raise err from exc
    finally:
        ranks.close()
        if lock is not None:
            lock.release()


def _check_backbone_accumulation(cfg: MeftConfig) -> None:
    """Lomo/AdaLomo update each weight inside backward, so a step cannot accumulate micro-batches."""
    if cfg.backbone != "frozen" and cfg.grad_accum_steps > 1:
        raise ValueError(f"--backbone {cfg.backbone} with --grad-accum-steps {cfg.grad_accum_steps}: the fused "
                         "backbone optimizer updates each weight inside backward, so it cannot accumulate "
                         "micro-batches; fix: --grad-accum-steps 1 with a larger --batch-size (under torchrun the "
                         "global batch is split across ranks), or --backbone frozen")


def _load_newest(candidates: list[Path], model, main: bool) -> tuple[Path, dict]:
    """Load the newest checkpoint that loads; one that fails is skipped with the reason."""
    for folder in candidates:
        try:
            return folder, load_training_state(folder, model)
        except CheckpointError as exc:
            if main:
                print(f"meft: --resume: skipping checkpoint {folder.name}: {exc}", flush=True)
    raise ResumeError(f"--resume: none of the {len(candidates)} checkpoint(s) under {str(candidates[0].parent)!r} "
                      "loads (reasons above); fix: start over with --overwrite, or resume with the options the run "
                      "was started with")


def _keeps_final_checkpoint(args: TrainArgs, cfg: MeftConfig) -> bool:
    """A completed run keeps a checkpoint at its last step when periodic checkpoints were asked for, or when
    the backbone was trained (only a checkpoint holds it: the trade-off probe and --resume read it)."""
    return args.save_every > 0 or cfg.backbone != "frozen"


def _train(args: TrainArgs, cfg: MeftConfig, ranks: Ranks, probe, candidates: list[Path], options: dict) -> dict:
    out, main = Path(args.output_dir), ranks.main
    meft, model, tokenizer, data = setup_run(args, cfg)
    check_layer_choice(cfg.layers, model)
    background = locality_background(cfg, tokenizer, data, main)
    pack = resolve_packing(args.packing, model)
    total = args.steps or max(1, math.ceil(args.epochs * data.batches.batches_per_epoch / cfg.grad_accum_steps))
    resuming = bool(candidates)
    evaluate_before = args.eval_before and not resuming and main
    before = _evaluate(model, tokenizer, data, args, "before") if evaluate_before else {}
    ranks.barrier()  # the other ranks wait for rank 0's evaluation before the collectives of training
    model.train()
    meft.wrap(model, cfg)
    rt = model.meft
    if main:
        print(rt.summary_table(), flush=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(args.lr_schedule, args.warmup_steps, total))
              for o in (rt.optimizer, rt.backbone_optimizer) if o is not None]
    start = 0
    if resuming:
        resume_from, st = _load_newest(candidates, model, main)
        start, before = st["step"], st["extra"].get("before", {})
        if start > total or (start == total and completed_run(out) is not None):
            rt.close()
            raise ResumeError(
                f"--resume: checkpoint {resume_from.name} is at step {start} and this run ends at step {total} "
                f"(--steps {args.steps}" + (f", from --epochs {args.epochs}" if not args.steps else "") + "): nothing "
                f"left to train. Fix: pass --steps larger than {start} to train further; the trained adapter of a "
                "completed run is in its adapter/")
        data.batches.load_state_dict(st["data"])
        for s in scheds:
            s.last_epoch = start - 1
            s.step()
        if main:
            print(f"meft: resumed from {resume_from} at step {start}{_reshard_note(st, ranks)}", flush=True)
    run_config = {"train": asdict(args), "meft": cfg.to_dict(), "world_size": ranks.world}
    if main:
        log = MetricsLog(out, resume_step=start)
        atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
        tracker = open_tracker(args.report_to, out, run_config)
    interrupted, t_train = False, time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="train", disable=not (args.progress and main), dynamic_ncols=True)
    prev = step_traffic(rt)
    keep_final = _keeps_final_checkpoint(args, cfg)
    with _StopFlag(ranks) as stop:
        for step in range(start + 1, total + 1):
            t0 = time.perf_counter()
            batches = [ranks.shard(next(data.batches)) for _ in range(cfg.grad_accum_steps)]
            if background is not None:  # locality: every micro-batch also carries background questions
                batches = background.join(batches, step, ranks.rank, data.batches.pad_token_id)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # input tokens, padding excluded
            stats: dict = {}
            loss, _labelled = train_step(model, rt, batches, cfg.grad_accum_steps, pack=pack,
                                         locality_weight=cfg.locality_weight, stats=stats)
            for s in scheds:
                s.step()
            loss, tokens, stop_now = ranks.reduce(loss, tokens, stop.requested)  # every rank decides alike
            if "locality" in stats:  # the term's mean over ranks
                stats["locality"] = ranks.reduce(stats["locality"], 0, False)[0]
            dt = time.perf_counter() - t0
            rec, prev = _step_record(rt, prev, step=step, loss=loss, tokens=tokens, dt=dt)
            rec.update(stats)
            last = step == total
            if main:
                log.write(rec)
                tracker.log_record(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", rows=rec["active_rows"],
                                down=f"{rec['mb_down']:.1f}MB", up=f"{rec['mb_up']:.1f}MB",
                                upd=f"{rec['cpu_update_ms']:.0f}ms")
                if stop_now or (last and keep_final) or (args.save_every and step % args.save_every == 0):
                    save_training_state(out, step, model, data_state=data.batches.state_dict(),
                                        extra={"before": before, "world_size": ranks.world},
                                        keep=args.keep_checkpoints, options=options)
            if stop_now and not last:
                interrupted = True
                break
    bar.close()
    train_s = time.perf_counter() - t_train
    signum = stop.signum if interrupted else None
    if not main:  # the replicas are rank 0's: it writes the run folder and evaluates
        rt.close()
        return {"rank": ranks.rank, "interrupted": interrupted, "signal": signum}
    tracker.close()
    records = log.read()
    log.close()
    plot_loss_curve(records, out / "loss.png")
    adapter_dir = out / "adapter"
    # `meft generate` / `meft eval` put the same system message first by default (their --system-prompt auto)
    save_adapter(model, adapter_dir, training={"system_prompt": "model" if data.system_prompt is None
                                               else data.system_prompt})
    after = _evaluate(model, tokenizer, data, args, "after") if args.eval_after and not interrupted else {}
    summary = run_summary(args, cfg, rt, records, before, after, train_s, interrupted)
    summary["signal"] = signum
    print(summary_table(summary), flush=True)
    kept = "checkpoints/, " if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")) else ""
    print(f"meft: run folder {out} (metrics.jsonl, loss.png, adapter/, {kept}summary.json)")
    if probe is not None and not interrupted:
        summary["trade_off"] = probe(model, tokenizer)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    rt.close()
    return summary


def locality_background(cfg: MeftConfig, tokenizer, data: RunData, main: bool = True) -> BackgroundQuestions | None:
    """The locality term's background questions (`meft.data.locality`), or None with locality_weight 0: outside
    the run's training subjects and the trade-off probe's facts, asked with the run's system prompt."""
    if not cfg.locality_weight:
        return None
    bg = BackgroundQuestions(tokenizer, per_batch=cfg.locality_background, exclude=data.train_subjects,
                             system_prompt=data.system_prompt, seed=cfg.seed)
    if main:
        print(f"meft: locality: {cfg.locality_background} of {len(bg.rows)} background questions per micro-batch, "
              f"loss + {cfg.locality_weight} x mean relu(||delta h|| - {cfg.locality_margin})^2 over their tokens",
              flush=True)
    return bg


def _reshard_note(state: dict, ranks: Ranks) -> str:
    """Resuming with another number of ranks is resharding, and needs nothing else: a checkpoint holds one
    replica of the stores, the router gates and the backbone (identical on every rank) and the position of
    the global batch stream; each rank of the new run takes its shard of the same global batches."""
    saved = state["extra"].get("world_size", 1)
    if saved == ranks.world:
        return ""
    return (f" (written by {saved} rank(s), resumed on {ranks.world}: the global batch of --batch-size examples is "
            f"now split {ranks.world} ways; the run continues as the {saved}-rank one would, up to fp32 summation "
            f"order and the top-k routing ties it can flip)")


def _step_record(rt, prev: dict, *, step: int, loss: float, tokens: int, dt: float) -> tuple[dict, dict]:
    """(one metrics.jsonl record, traffic now): this step's traffic (differences of `step_traffic`),
    learning rate and routing of its latest micro-batch."""
    now, routing = step_traffic(rt), rt.routing_stats()
    d = {k: now[k] - prev[k] for k in now}
    return {"step": step, "loss": loss, "tokens": tokens, "tokens_per_s": tokens / dt, "step_s": dt,
            "active_rows": d["rows_down"], "rows_up": d["rows_up"], "mb_down": d["bytes_down"] / 1e6,
            "mb_up": d["bytes_up"] / 1e6, "cpu_update_ms": d["cpu_ms"], "lr": rt.optimizer.param_groups[0]["lr"],
            "distinct_experts": routing["distinct_experts"], "dropped_share": routing["dropped_share"],
            **({"updated_rows": routing["updated_rows"]} if "updated_rows" in routing else {})}, now  # sparse_update
