"""`meft inspect ADAPTER [--data FILE]`: which rows and experts of a saved adapter were trained, how
large their values grew, and (with --data) which training examples route most to the top experts.

ADAPTER is an adapter folder (`meft.save_adapter`, run_dir/adapter) or a `meft train` run folder. In a
run folder, the latest checkpoint's per-row AdamW step counts say which rows were trained (when its
rows equal the adapter's); otherwise rows whose value half is nonzero count as trained (values start
at exactly 0, so this finds the rows that changed: a row updated only with zero value gradients, its
relu never firing, is not counted). The output says which rule was used. The logic is
`meft.adapter.inspect`; this file resolves paths, loads model and data, and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from meft.adapter.inspect import adapter_stats, plot_usage, report_tables, route_examples
from meft.adapter.saving import CONFIG_NAME, load_adapter
from meft.cli.options import add_command, resolve_options
from meft.data.builtin import load_builtin
from meft.data.files import load_records
from meft.data.records import collate, encode_record
from meft.data.sources import parse_data_spec
from meft.option_field import opt
from meft.pretrained import load_model
from meft.train.checkpoint import latest_checkpoint

__all__ = ["add_parser", "run", "InspectArgs"]

EPILOG = """examples:
  meft inspect runs/meft                                  # usage per layer, top experts, runs/meft/inspect.png
  meft inspect runs/meft --data world_facts:50            # + the examples that route most to each top expert
  meft inspect my-adapter --data train.jsonl --model ./my-hf-folder --top 10
"""


@dataclass
class InspectArgs:
    data: str | None = opt(None, "Training data to route through the adapted model (a .jsonl/.json/.parquet "
                          "file or a built-in set, as in `meft train`): shows which examples route most to "
                          "each top expert. Needs the base model (--model).")
    model: str | None = opt(None, "Base model the adapter was trained on (for --data); default: the 'model' "
                           "in the run folder's config.json.")
    top: int = opt(5, "How many experts to list (largest value norm over all layers).")
    per_expert: int = opt(3, "Examples shown per top expert (with --data).")
    limit: int = opt(256, "Route at most this many examples (a seeded sample; 0 = all).")
    batch_size: int = opt(16, "Examples per forward pass when routing.")
    max_length: int = opt(128, "Longest tokenized example routed (longer ones are truncated).")
    png: str | None = opt(None, "Where to write the PNG (value norm and trained share per layer and expert); "
                         "default: inspect.png beside the adapter folder; 'none' skips it.")
    device: str = opt("cpu", "Device for routing with --data: 'cpu' or 'cuda[:i]'.")
    seed: int = opt(0, "Seed of the built-in data and of the sample.")
    debug: bool = opt(False, "Show full tracebacks for user errors.")


def add_parser(sub) -> None:
    p = add_command(sub, "inspect", help="look inside a trained adapter: trained rows, experts, routing",
                    description=__doc__, epilog=EPILOG, run=run, groups=[(InspectArgs, "inspect")])
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (run_dir/adapter) or `meft train` run folder")


def _resolve(path: str) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None)."""
    p = Path(path)
    if (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter", p
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path!r} is neither an adapter folder ({CONFIG_NAME}) nor a run folder "
                                "holding adapter/; fix: pass run_dir or run_dir/adapter of `meft train`")
    return p, (p.parent if _run_config(p.parent) or (p.parent / "checkpoints").is_dir() else None)


def _run_config(run_dir: Path) -> dict | None:
    """`meft train`'s config.json of a run folder (not an HF model's config.json), or None."""
    path = run_dir / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else None
    return cfg if isinstance(cfg, dict) and "train" in cfg and "meft" in cfg else None


def _records(spec: str, seed: int, limit: int) -> list[dict]:
    kind, kw = parse_data_spec(spec)
    records = load_records(kw["path"]) if kind == "file" else load_builtin(kind, **kw, seed=seed).train
    if limit and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    return records


def _label(rec: dict) -> str:
    if "prompt" in rec:
        text = rec["prompt"]
    elif "messages" in rec:
        text = next(m["content"] for m in rec["messages"] if m["role"] == "user")
    else:
        text = rec["text"]
    return " ".join(text.split())


def _batches(records, tokenizer, a: InspectArgs):
    ex = []
    for rec in records:
        ids = (encode_record(rec, tokenizer)["input_ids"] if "text" not in rec
               else list(tokenizer(rec["text"])["input_ids"]))[: a.max_length]
        ex.append({"input_ids": ids, "labels": ids})
    for i in range(0, len(ex), a.batch_size):
        yield collate(ex[i:i + a.batch_size], tokenizer.pad_token_id)


def _model_name(a: InspectArgs, run_dir: Path | None) -> str:
    if a.model:
        return a.model
    cfg = _run_config(run_dir) if run_dir else None
    if cfg is None:
        raise ValueError("--data needs the base model: pass --model (the model the adapter was trained on)")
    return cfg["train"]["model"]


def run(args: argparse.Namespace) -> int:
    (a,) = resolve_options(args, [InspectArgs])
    args.debug = a.debug
    adapter_dir, run_dir = _resolve(args.adapter)
    ckpt = latest_checkpoint(run_dir) if run_dir is not None and (run_dir / "checkpoints").is_dir() else None
    stats = adapter_stats(str(adapter_dir), str(ckpt) if ckpt else None)
    routing = labels = None
    if a.data:
        records = _records(a.data, a.seed, a.limit)
        model, tokenizer = load_model(_model_name(a, run_dir), device=a.device)
        load_adapter(model, str(adapter_dir), verbose=False)
        routing = route_examples(model, _batches(records, tokenizer, a))
        labels = [_label(r) for r in records]
        model.meft.close()
    print(f"adapter {adapter_dir}: {len(stats)} layers, {stats[0].n_rows:,} rows x {stats[0].n_experts} experts "
          f"per layer" + (f"; step counts from {ckpt}" if stats[0].source == "step counts" else ""))
    print(report_tables(stats, routing, labels, top=a.top, per_expert=a.per_expert))
    if (a.png or "").lower() != "none":
        png = a.png or os.path.join(adapter_dir.parent, "inspect.png")
        if plot_usage(stats, png):
            print(f"meft: wrote {png}")
    return 0
