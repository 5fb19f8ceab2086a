"""`meft train`: fine-tune a model with a MEFT adapter (defaults: SmolLM2-135M-Instruct, world facts).

Owns the command's options and what it shows after the run: the training loop's own summary
(`meft.train.loop`), then the trade-off probe (`ProbeArgs`): the base model and the fine-tuned one (base +
the run's adapter, and its trained backbone for --backbone lomo/adalomo) answer the built-in retention set
and a few free prompts (`meft.data.retention`, `meft.trade_off`), and the fine-tuned model is read on the
general prompts the base model continued (`meft.agreement`), shown as a table and
stored as `trade_off` in summary.json -- what was learned above it, what was lost here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import meft
from meft.adapter.saving import load_adapter
from meft.cli.options import add_command, resolve_options
from meft.config import MeftConfig, opt, parse_backbone_dtype
from meft.data.sources import parse_data_spec, resolve_system_prompt
from meft.pretrained import load_model
from meft.trade_off import trade_off_probe, trade_off_summary
from meft.train.args import TrainArgs
from meft.train.checkpoint import latest_checkpoint, load_training_state
from meft.train.loop import train
from offload.text import format_table

__all__ = ["add_parser", "run", "ProbeArgs", "trade_off", "in_place_probe", "trade_off_table"]

EPILOG = """examples:
  meft train                                   # default model, built-in world facts, before/after accuracy
  meft train --data fictional_facts:2000 --steps 300 --adapter-rows 32768
  meft train --data my.jsonl --model ./my-hf-folder --backbone lomo --backbone-lr 1e-5
  meft train --config run.yaml --resume        # continue the run in output_dir exactly
"""


@dataclass
class ProbeArgs:
    retention: bool = opt(True, "After training, score 30 world facts that the default model answers correctly "
                          "and the built-in training data does not contain (capitals, demonyms, regions, currency "
                          "codes of other countries) with the base and the fine-tuned model: the share of known "
                          "facts still answered is what fine-tuning kept (summary table and summary.json "
                          "'trade_off'). `--retention false` skips it.")
    generations: bool = opt(True, "After training, answer a few free prompts ('What is the capital of Peru?', "
                            "'Write one sentence about the sea.', ...) with the base and the fine-tuned model, "
                            "side by side in the summary. `--generations false` skips it. With a frozen backbone "
                            "both probes use the trained model in memory (adapters off = the base model); with "
                            "--backbone lomo/adalomo they reload the base model and the last checkpoint.")
    general: bool = opt(True, "After training, the share of tokens on which the fine-tuned model's next-token "
                        "choice agrees with the base model's own continuation of 48 built-in general prompts "
                        "(instructions, prose, code, arithmetic; no facts), teacher-forced: 1.0 = general behaviour "
                        "untouched (summary table and summary.json 'trade_off.general'). `--general false` skips it.")


def add_parser(sub) -> None:
    add_command(sub, "train", help="fine-tune with a sparse adapter held in CPU memory", description=__doc__,
                epilog=EPILOG, run=run, groups=[(TrainArgs, "run"), (MeftConfig, "adapter (MeftConfig)"),
                                                (ProbeArgs, "trade-off probe (after training)")])


def run(args: argparse.Namespace) -> int:
    targs, cfg, pargs = resolve_options(args, [TrainArgs, MeftConfig, ProbeArgs])
    args.debug = targs.debug
    parts = {"retention": pargs.retention, "generations": pargs.generations, "general": pargs.general}
    wanted = any(parts.values())
    # frozen backbone: the trained model in memory, its adapters switched off for the base (no reload)
    in_place = in_place_probe(targs, **parts)
    summary = train(targs, cfg, probe=in_place if wanted and cfg.backbone == "frozen" else None)
    if "rank" not in summary and not summary["interrupted"] and wanted:
        if "trade_off" not in summary:  # a trained backbone: base and fine-tuned model loaded afresh
            summary["trade_off"] = trade_off(targs, cfg, **parts)
            _rewrite_json(Path(targs.output_dir) / "summary.json", summary)
        print(trade_off_table(summary["trade_off"]), flush=True)
    if summary["interrupted"]:  # stopped by a signal after saving: the conventional 128 + signal number
        return 128 + (summary.get("signal") or 2)
    return 0


def _probe_kw(targs: TrainArgs, tokenizer, retention: bool, generations: bool, general: bool) -> dict:
    # asked as the run trained and scored (an empty system turn for the built-in data), as `meft generate` asks
    system = resolve_system_prompt(targs.system_prompt, tokenizer, builtin=parse_data_spec(targs.data)[0] != "file")
    return {"retention": retention, "generations": generations, "general": general,
            "batch_size": targs.eval_batch_size, "system_prompt": system}


def _reference(base: dict) -> dict | None:
    """The base probe's general-prompt reference, handed to the fine-tuned model's probe."""
    return base.get("general", {}).get("reference")


def in_place_probe(targs: TrainArgs, *, retention: bool = True, generations: bool = True, general: bool = True):
    """The trade-off probe on a run's trained model (frozen backbone) before the loop releases it: the base
    model is that model with every adapter switched off (`SparseFFNAdapter.enabled`, exactly the base
    model's forward), the fine-tuned one the same model with them on. Saves reloading the base model and
    the adapter."""
    def probe(model, tokenizer) -> dict:
        t0 = time.perf_counter()
        kw = _probe_kw(targs, tokenizer, retention, generations, general)
        adapters = model.meft.adapters
        model.eval()
        for ad in adapters:
            ad.enabled = False
        try:
            base = trade_off_probe(model, tokenizer, **kw)
        finally:
            for ad in adapters:
                ad.enabled = True
        tuned = trade_off_probe(model, tokenizer, reference=_reference(base), **kw)
        return {**trade_off_summary(base, tuned), "seconds": round(time.perf_counter() - t0, 1)}

    return probe


def trade_off(targs: TrainArgs, cfg: MeftConfig, *, retention: bool = True, generations: bool = True,
              general: bool = True) -> dict:
    """Probe the base model, then the run's fine-tuned model, loaded afresh from the run folder (the
    training loop has released its model; `meft train` does this for a trained backbone, `in_place_probe`
    otherwise): `meft.trade_off.trade_off_summary` plus ``seconds``."""
    t0 = time.perf_counter()
    gc.collect()  # the trained model (a reference cycle with its runtime) goes before a second one loads
    out = Path(targs.output_dir)
    device = "cuda" if targs.device == "auto" and torch.cuda.is_available() else targs.device
    device = "cpu" if device == "auto" else device
    model, tokenizer = load_model(targs.model, dtype=parse_backbone_dtype("--dtype", targs.dtype), device=device)
    kw = _probe_kw(targs, tokenizer, retention, generations, general)
    base = trade_off_probe(model, tokenizer, **kw)
    if cfg.backbone == "frozen":
        load_adapter(model, str(out / "adapter"), verbose=False)
    else:  # the fine-tuned model is base + adapter + the trained backbone, which only a checkpoint holds
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint under {str(out / 'checkpoints')!r} to probe the trained backbone")
        meft.wrap(model, cfg)
        load_training_state(ckpt, model)
    model.eval()
    tuned = trade_off_probe(model, tokenizer, reference=_reference(base), **kw)
    model.meft.close()
    return {**trade_off_summary(base, tuned), "seconds": round(time.perf_counter() - t0, 1)}


def trade_off_table(t: dict, width: int = 44) -> str:
    """The trade-off probe for the console: retention before/after, the facts lost, general-prompt agreement,
    free prompts side by side."""
    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[:width - 3] + "..."

    parts = []
    if "retention" in t:
        r = t["retention"]
        kept = "-" if r["kept"] is None else f"{r['kept']:.1%}"
        parts.append(format_table([
            ["retention contains", f"{r['before']:.1%}", f"{r['after']:.1%}"],
            ["retention exact_match", f"{r['exact_match_before']:.1%}", f"{r['exact_match_after']:.1%}"],
            ["known facts kept", "", kept],
        ], ["metric", "before", "after"]))
        parts[-1] = (f"retention: {r['n']} facts the default model knows, not in the training data\n" + parts[-1])
        lost = [i for i in r["items"] if i["prompt"] in set(r["lost"])][:3]
        if lost:
            parts.append("lost (first 3):\n" + format_table(
                [[cut(i["prompt"]), cut(i["answers"][0]), cut(i["before"]), cut(i["after"])] for i in lost],
                ["question", "expected", "before", "after"]))
    if "general" in t:
        g = t["general"]
        worst = sorted(g["per_prompt"], key=lambda p: p["agreement"])[:3]
        parts.append(f"general prompts: the fine-tuned model's next token agrees with the base model's own "
                     f"continuation on {g['agreement']:.1%} of {g['n_tokens']} tokens ({g['n_prompts']} prompts; "
                     f"1.0 = untouched)\n" + format_table([[cut(p["prompt"]), f"{p['agreement']:.0%}"] for p in worst],
                                                          ["least agreement (3 prompts)", "agreement"]))
    if "generations" in t:
        parts.append("free prompts, base vs fine-tuned:\n" + format_table(
            [[cut(g["prompt"]), cut(g["base"]), cut(g["tuned"])] for g in t["generations"]],
            ["prompt", "base model", "fine-tuned"]))
    return "\n" + "\n\n".join(parts) + f"\n(trade-off probe: {t.get('seconds', 0):.0f} s)"


def _rewrite_json(path: Path, data: dict) -> None:
    """Replace `path` atomically: a kill mid-write leaves the old summary, not half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
