"""Fault matrix of `meft train`: every fault case (tests/meft/train/fault_cases.py) run as real processes on a
tiny local model, printed as a table of case and verdict.

    python experiments/fault_matrix.py            # 20 seeded kill -9 trials + SIGTERM, damage, lock, disk
    python experiments/fault_matrix.py --quick    # one trial of each kind
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.text import format_table  # noqa: E402
from tests.meft.train import fault_cases as fc  # noqa: E402


def make_tiny(root: Path) -> Path:
    """The tiny Llama + tokenizer folder and 24-record QA file the tests train (tests/conftest.py `tiny`)."""
    from tests.meft.data.test_records import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"prompt": f"What is the capital of France {i}?", "completion": "Paris"}) + "\n")
    return root


def cases(quick: bool):
    seeds = range(1) if quick else range(10)
    yield from ((fc.kill_in_training, (s,)) for s in seeds)
    yield from ((fc.kill_in_save, (s,)) for s in seeds)
    yield fc.sigterm, ()
    for part in (["state.pt"] if quick else ["stores.safetensors", "state.pt", "options.json", "manifest.json",
                                              "folder"]):
        yield fc.damaged_part, (part,)
    yield fc.occupied_folder, ()
    yield fc.concurrent_runs, ()
    if not quick:
        yield fc.full_disk, ()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one trial of each kind")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meft-faults-") as tmp:
        root = Path(tmp)
        tiny = make_tiny(root / "tiny")
        ref = fc.reference(tiny, root)
        rows = []
        for fn, extra in cases(args.quick):
            v = fn(tiny, root, ref, *extra)
            verdict = "skipped" if v.detail.startswith("SKIPPED") else ("ok" if v.ok else "FAILED")
            rows.append([v.case, verdict, v.detail[:90]])
            print(f"{verdict:8} {v.case}", flush=True)
    print(format_table(rows, ["case", "verdict", "detail"]))
    failed = sum(r[1] == "FAILED" for r in rows)
    print(f"{len(rows)} cases: {len(rows) - failed} ok or skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
