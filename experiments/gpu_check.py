"""GPU validation kit: the first thing to run on a machine with a CUDA device (docs/design.md "Devices").

  a cuda_tests  `pytest -q -m cuda tests/` in a subprocess: passed / failed / skipped, failing test names
  b twin        tiny Llama (LlamaConfig, seeded random fp32 weights) trained a few steps with
                MeftConfig(offload=True) (TransferScheduler) and offload=False (offload.ResidentScheduler):
                losses and adapter rows compared (max abs diff vs TOL), plain, grad_accum_steps=2 + clip
                'layer', staleness=1 + clip 'global', zero-copy (fetch_mode='zero_copy', alone and with
                staleness 1 + accumulation 2), each with a bf16 and an fp32 wire
  c syncs       forward, backward and optimizer step of the wrapped model under
                torch.cuda.set_sync_debug_mode("warn") (warnings counted, top call sites) and a
                TorchDispatchMode counting sync-class aten ops with their call sites (docs/design.md: none in
                the adapter path); staged and zero-copy fetch
  d pinned      pinned host tensors reachable from model.meft (stores, staging slots, ids buffers): exact
                bytes vs what the pinned allocator holds (power-of-two rounding), host RSS of wrap; staged
                and zero-copy (the mirrors pinned at their exact size)
  e step_time   MEFT (frozen backbone; staged, and zero-copy as meft_zc) vs LoRA r=16 (peft, bf16 adapter
                weights: autocast_adapter_dtype=False) on the SmolLM2-135M and TinyLlama-1.1B shapes (from
                configs, random weights, bf16, batch 8 x 256) and TinyLlama-1.1B at 8 x 1024 (a compute-bound
                point: a host-bound step barely grows with the batch): 5 warm-up and 20 timed steps with the
                garbage collector frozen and disabled, each step synchronised; median

    PYTHONPATH=. python3 experiments/gpu_check.py --out $OUT/gpu.json [--quick] [--only a,b,...]
    python3 experiments/gpu_check.py --device cpu --quick    # dry run without a GPU: b, c, d, e (tiny)

Each section reports {"ok", "error"} (one failure never hides the others), "passed" (its check held;
None where nothing is checked) and a one-line "summary"; a table is printed, and the last stdout line is
the JSON object. Exit status 1 only when a section raised. Without CUDA it prints so and exits 0.
Each section is a module of `experiments/gpu_check_sections/`; this file picks, times and reports them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.gpu_check_sections.common import release  # noqa: E402
from experiments.gpu_check_sections.cuda_tests import sec_cuda_tests  # noqa: E402
from experiments.gpu_check_sections.pinned import sec_pinned  # noqa: E402
from experiments.gpu_check_sections.step_time import sec_step_time  # noqa: E402
from experiments.gpu_check_sections.syncs import sec_syncs  # noqa: E402
from experiments.gpu_check_sections.twin import sec_twin  # noqa: E402

BUDGET_S, TOTAL_S = {"a": 150, "b": 60, "c": 45, "d": 60, "e": 240}, 480  # soft limits (b-e halved by --quick)
SECTIONS = {"a": "cuda_tests", "b": "twin", "c": "syncs", "d": "pinned", "e": "step_time"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller configs, fewer steps, half the time budgets")
    ap.add_argument("--only", default="", help="comma-separated sections: a,b,c,d,e (or their names)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)  # 'cpu': dry run without a GPU
    a = ap.parse_args(argv)
    dev = a.device or ("cuda" if torch.cuda.is_available() else None)
    result = {"cuda": torch.cuda.is_available()}
    if dev is None:
        print("no CUDA device present: nothing to check (--device cpu runs a dry run on the CPU)")
    else:
        import transformers

        if dev == "cpu":
            torch.set_num_threads(1)  # dry run: the host worker and copy threads need the other cores
        t_all = time.monotonic()
        result.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
                      torch=torch.__version__, transformers=transformers.__version__, quick=a.quick, sections={})
        names = {v: k for k, v in SECTIONS.items()}
        only = {names.get(x.strip(), x.strip()) for x in a.only.split(",") if x.strip()} or set(SECTIONS)
        funcs = {"a": sec_cuda_tests, "b": sec_twin, "c": sec_syncs, "d": sec_pinned, "e": sec_step_time}
        for key in sorted(only & set(SECTIONS)):
            t0 = time.monotonic()
            quick = a.quick and dev == "cuda" and key != "a"  # the tests take what they take
            deadline = min(t0 + BUDGET_S[key] * (0.5 if quick else 1.0), t_all + TOTAL_S)
            try:
                res = {"ok": True, "error": None, **funcs[key](a, dev, deadline)}
            except Exception:  # noqa: BLE001 - one section's failure must not hide the others
                res = {"ok": False, "error": traceback.format_exc()[-2000:], "passed": False, "summary": "raised"}
            res["seconds"] = round(time.monotonic() - t0, 1)
            result["sections"][f"{key}_{SECTIONS[key]}"] = res
            release()  # whatever the section left behind, also after a failure
        secs = result["sections"].values()
        result.update(all_ok=all(s["ok"] for s in secs), all_passed=all(s.get("passed") is not False for s in secs),
                      total_s=round(time.monotonic() - t_all, 1))
        print(f"\n{'section':<14}{'ok':<5}{'passed':<8}{'s':>7}  summary")
        for name, s in result["sections"].items():
            print(f"{name:<14}{'yes' if s['ok'] else 'NO':<5}{s.get('passed')!s:<8}{s['seconds']:>7}  {s['summary']}")
            if s["error"]:
                print("  " + s["error"].strip().splitlines()[-1])
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0 if result.get("all_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
