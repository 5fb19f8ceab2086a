"""What `--resume` continues from, and whether this command may continue it.

Owns the options that define a run (`defining_options`: every `meft train` and MeftConfig option except
`MAY_CHANGE`, which only change how the run is watched, saved, scored or how long it goes on), their check
against the ones a checkpoint recorded (`check_options`: a difference is an error naming the field, both
values and the fix), and the choice of checkpoint (`resume_candidates`: complete, verified checkpoints
newest first; each damaged or missing one is reported with the reason it was skipped). All of it runs
before any model loads.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from meft.atomic import read_pointer_name
from meft.train.checkpoint import OPTIONS_NAME
from meft.train.manifest import MANIFEST_NAME, verify_manifest

__all__ = ["MAY_CHANGE", "OPTIONS_NAME", "ResumeError", "defining_options", "check_options",
           "resume_candidates", "may_change_help", "plan_resume", "completed_run"]

# options a resumed run may give other values: how long it goes on, how it is saved, watched and scored
MAY_CHANGE = {
    "train": ("steps", "epochs", "save_every", "keep_checkpoints", "report_to", "progress", "eval_data",
              "eval_limit", "eval_batch_size", "max_new_tokens", "eval_before", "eval_after", "debug", "resume",
              "overwrite", "output_dir", "device", "gradient_checkpointing"),
    "meft": ("inference_rows", "fetch_mode", "copy_timing"),
}


class ResumeError(ValueError):
    """`--resume` cannot continue as asked; the message says why and what to do."""


def may_change_help() -> str:
    """The options a resumed run may change, as `--help` lists them."""
    return ", ".join("--" + n.replace("_", "-") for part in MAY_CHANGE.values() for n in part
                     if n not in ("resume", "overwrite"))


def defining_options(args, cfg) -> dict:
    """{"train": {...}, "meft": {...}}: the options that define the run (a checkpoint records them)."""
    train, meft = asdict(args), cfg.to_dict()
    return {"train": {k: v for k, v in train.items() if k not in MAY_CHANGE["train"]},
            "meft": {k: v for k, v in meft.items() if k not in MAY_CHANGE["meft"]}}


def _norm(v):
    return json.loads(json.dumps(v, default=str))  # tuples vs lists, as both sides went through JSON


def check_options(saved: dict, now: dict, checkpoint: Path) -> None:
    """Refuse to resume when an option that defines the run differs from the one `checkpoint` recorded."""
    diffs = []
    for part in ("train", "meft"):
        old, new = saved.get(part, {}), now.get(part, {})
        for name in sorted(set(old) & set(new)):
            if _norm(old[name]) != _norm(new[name]):
                diffs.append(f"--{name.replace('_', '-')}: the run has {old[name]!r}, this command {new[name]!r}")
    if diffs:
        raise ResumeError(
            f"--resume: the options differ from the run being continued ({checkpoint}): " + "; ".join(diffs) +
            ". Fix: rerun with the run's values (they are in its config.json; `--config` accepts that file), or "
            "start a new run with another --output-dir. Options a resume may change: " + may_change_help())


def _step(p: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def resume_candidates(output_dir: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(complete checkpoints newest first, [(name, why skipped)]) under `output_dir/checkpoints`.
    A checkpoint without a manifest and without recorded options was written by an older meft: kept,
    unverified (a file that fails to load is skipped then)."""
    root = Path(output_dir) / "checkpoints"
    good, skipped = [], []
    named = read_pointer_name(root)
    if named and not (root / named).is_dir():
        skipped.append((named, "`latest` names it but the folder is missing"))
    folders = sorted((p for p in root.glob("step-*") if p.is_dir() and _step(p) >= 0), key=_step, reverse=True)
    for p in folders:
        legacy = not (p / MANIFEST_NAME).exists() and not (p / OPTIONS_NAME).exists()
        why = None if legacy and (p / "state.pt").is_file() else verify_manifest(p)
        if why is None:
            good.append(p)
        else:
            skipped.append((p.name, why))
    return good, skipped


def read_options(checkpoint: Path) -> dict | None:
    path = checkpoint / OPTIONS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def completed_run(output_dir: str | Path) -> dict | None:
    """The summary of a run in `output_dir` that finished (not interrupted), else None."""
    path = Path(output_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and not summary.get("interrupted", True) else None


def plan_resume(output_dir: str | Path, options: dict, *, verbose: bool = True) -> list[Path]:
    """The checkpoints `--resume` may load, newest first, after checking this command's options against
    the run's. Prints each skipped checkpoint with the reason; raises `ResumeError` when none is left."""
    out = Path(output_dir)
    good, skipped = resume_candidates(out)
    for name, why in skipped if verbose else ():
        print(f"meft: --resume: skipping checkpoint {name}: {why}", flush=True)
    if not good:
        done = completed_run(out)
        if done is not None and not skipped:
            raise ResumeError(
                f"--resume: the run in {str(out)!r} completed ({done.get('steps')} steps) and kept no checkpoint "
                f"(--save-every 0, the default, keeps none at the end): nothing to resume; its adapter is in "
                f"{str(out / 'adapter')!r}. Fix: start a new run (another --output-dir, or --overwrite); to be "
                "able to train a finished run further, train it with --save-every N")
        tried = f" ({len(skipped)} damaged or missing, listed above)" if skipped else ""
        raise ResumeError(f"--resume: no complete checkpoint under {str(out / 'checkpoints')!r}{tried}; fix: "
                          "drop --resume and pass --overwrite to start over, or point --output-dir at the run")
    saved = read_options(good[0])
    if saved is not None:
        check_options(saved, options, good[0])
    return good
