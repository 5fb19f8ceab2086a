"""Data parallel on CPU gloo: 1 vs 2 ranks on the same global batch -- step time, the bytes the
ranks exchange per step against the analytic minimum, host RAM per node, and whether 2 ranks equal 1.

Setup: a small Llama built from a config (no download: `--hidden` d, `--layers`, `--vocab`, seeded weights,
fp32), `meft.wrap` with a frozen backbone, `--rows` rows per layer, every row allowed to be active (the
budget does not bind, so 2 ranks route exactly as one process), fp32 wire (the ranks' average equals the
whole batch's gradient up to fp32 summation order). The global batch is `--batch` random-token sequences
of `--seq` tokens, all labelled; rank r of 2 trains rows [r B/2, (r+1) B/2) of it with the loop `meft train`
runs (`meft.train.loop.train_step`), and the 1-rank run trains the same two halves as 2 accumulated
micro-batches (the single-process equivalent data parallel is defined to equal: each shard routed on its
own, its gradients summed before one update; `meft train --grad-accum-steps 2` on the global batch).
Each configuration is one `torchrun --standalone --nproc_per_node W`
launch of this script (`--worker`), so both pay the same launcher; the two share this machine's cores with
whatever else runs (step times on 2 shared cores are an upper bound of the overhead). Measured:

* `step_s`: median wall time of the timed steps on rank 0 (a barrier before each step under 2 ranks).
* `exchange_bytes_vs_analytic`: the row-gradient exchange metered as traffic kind "collective" by
  `offload.collective.RowGradReducer` (bytes this rank sends: counts, padded ids, the fp32 [U, 2d] block),
  per step, over the analytic minimum per rank: per layer and step, the union's ids (8 bytes each) + U rows x
  2d x wire bytes, with U the union of the ranks' active rows that the reducer combined (its metered rows).
* `host_ram_copies_per_node`: copies of the row stores on the node, measured from the ranks' memory
  mappings (`MeftRuntime.host_copies`, which asks /proc/self/maps: shared segments are one copy); also the
  ranks' PSS (proportional set size: shared pages count once per node in total) summed per node, vs the
  stores' bytes.
* `two_rank_equal_to_one`: rows, both AdamW moments, per-row step counts and router gates of rank 0 after
  the last step vs the 1-rank run: equal within the stated tolerance (moments / steps exact or to 1e-5
  relative; rows and gates to 1e-4 absolute, 1% of one lr step -- AdamW magnifies last-bit differences
  where |g| ~ eps); `bitwise` says whether they are identical bit for bit.

    python experiments/bench_distributed.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

__all__ = ["main", "measure"]

LR = 1e-2
QUICK = {"hidden": 128, "layers": 2, "rows": 4096, "seq": 32, "steps": 2, "warmup": 1}


def _model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(64, args.seq), tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()


def _config(args, grad_accum_steps: int = 1):
    import meft

    return meft.MeftConfig(adapter_rows=args.rows, expert_size=16, experts_per_token=4,
                           max_active_rows=args.rows, wire_dtype="float32", adapter_lr=LR, router_lr=LR,
                           grad_accum_steps=grad_accum_steps)


def _pss_bytes() -> dict:
    """This process's proportional set size and its parts (anonymous / shared memory / files), in bytes."""
    out = {"Pss": 0, "Pss_Anon": 0, "Pss_Shmem": 0, "Pss_File": 0}
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def worker(args) -> None:
    """One rank (under torchrun): train, meter, measure memory; rank 0 writes OUT/result_w{W}.pt."""
    import torch.distributed as dist

    import meft
    from meft.train import train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo")
    micro = 2 if world == 1 else 1  # see below
    model = meft.wrap(_model(args), _config(args, micro))
    rt = model.meft
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
               for _ in range(args.warmup + args.steps)]
    # the 1-rank run accumulates the 2 ranks' shards as 2 micro-batches: what data parallel is defined to
    # equal (each shard routed on its own, under its own row budget; gradients summed before the update)
    per = args.batch // (world * micro)
    times = []
    for i, ids in enumerate(batches):
        parts = [ids[(rank * micro + j) * per:(rank * micro + j + 1) * per] for j in range(micro)]
        batch = [{"input_ids": p, "attention_mask": torch.ones_like(p), "labels": p} for p in parts]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        train_step(model, rt, batch, micro)
        rt.scheduler.flush()  # the step's host updates (and exchanges) are done
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    rt.sync_to_host()
    first_timed = rt.scheduler.step - args.steps + 1
    coll = [t for t in rt.meter.events()["transfers"] if t.direction == "collective" and t.step >= first_timed]
    width = rt.stores[0].width
    wire = torch.empty((), dtype=rt.scheduler.wire_dtype).element_size()
    sent = sum(t.nbytes for t in coll)
    analytic = sum(t.rows * (8 + width * wire) for t in coll)
    copies = rt.host_copies() if hasattr(rt, "host_copies") else None
    store_bytes = sum(s.weights.nbytes + s.exp_avg.nbytes + s.exp_avg_sq.nbytes + s.steps.nbytes for s in rt.stores)
    mine = {"pss": _pss_bytes(), "step_s": times}
    every = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    if rank == 0:
        torch.save({"world": world, "step_s": statistics.median(times), "step_s_all": times,
                    "exchange_bytes_per_step": sent / args.steps, "analytic_bytes_per_step": analytic / args.steps,
                    "exchanges": len(coll), "union_rows_per_exchange": statistics.mean(t.rows for t in coll) if coll
                    else 0, "copies": copies, "store_bytes": store_bytes,
                    "pss_per_rank": [e["pss"] for e in every], "pss_node": sum(e["pss"]["Pss"] for e in every),
                    "stores": [{k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
                               for s in rt.stores],
                    "gates": [ad.gate.detach().clone() for ad in rt.adapters]},
                   Path(args.worker) / f"result_w{world}.pt")
    rt.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _launch(args, out: str, world: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), "--worker", out, *_passthrough(args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // world)), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{world}-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return torch.load(Path(out) / f"result_w{world}.pt")


def _passthrough(args) -> list[str]:
    keys = ("hidden", "layers", "vocab", "rows", "batch", "seq", "steps", "warmup", "threads")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def compare(one: dict, two: dict) -> dict:
    """Rank 0 of the 2-rank run vs the 1-rank run: max differences, and the stated-tolerance verdict."""
    diffs, ok, bitwise, other_steps, ok_same_steps = {}, True, True, 0, True
    for a, b in zip(two["stores"], one["stores"]):
        same = a["steps"] == b["steps"]  # [rows]
        other_steps += int((~same).sum())
        for k in ("weights", "exp_avg", "exp_avg_sq"):  # the rows both runs updated equally often
            atol = 1e-4 if k == "weights" else 1e-6
            ok_same_steps &= torch.allclose(a[k][same], b[k][same], rtol=1e-5, atol=atol)
        for k in a:
            d = float((a[k].double() - b[k].double()).abs().max())
            diffs[k] = max(diffs.get(k, 0.0), d)
            bitwise &= torch.equal(a[k], b[k])
            if k == "steps":
                ok &= torch.equal(a[k], b[k])
            elif k == "weights":
                ok &= torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-4)
            else:
                ok &= torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(two["gates"], one["gates"]):
        diffs["gates"] = max(diffs.get("gates", 0.0), float((a - b).abs().max()))
        bitwise &= torch.equal(a, b)
        ok &= torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    # rows updated a different number of times: a token's top-k experts flipped at a near-tie of router scores
    # (scores differ in the last bits: another fp32 summation order), so that row got one update more or less
    return {"max_abs_diff": diffs, "rows_with_other_step_counts": other_steps,
            "equal_on_rows_with_equal_step_counts": bool(ok_same_steps), "bitwise": bool(bitwise),
            "equal": bool(ok)}


def measure(args) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        one = _launch(args, out, 1)
        two = _launch(args, out, 2)
    cmp = compare(one, two)
    copies = two["copies"] or {}
    d = args.hidden
    return {
        "model": f"Llama from config: d={d}, {args.layers} layers, vocab {args.vocab}, fp32, seeded",
        "adapter": f"{args.rows} rows/layer x 2d={2 * d}, every row may be active, frozen backbone, fp32 wire",
        "global_batch": f"{args.batch} x {args.seq} tokens", "steps_timed": args.steps, "warmup": args.warmup,
        "torch_threads_total": args.threads,
        "step_s": {"1_rank": one["step_s"], "2_ranks": two["step_s"]},
        "step_time_ratio_2_over_1": two["step_s"] / one["step_s"],
        "exchange_bytes_per_step_per_rank": two["exchange_bytes_per_step"],
        "analytic_min_bytes_per_step_per_rank": two["analytic_bytes_per_step"],
        "exchanges_per_step": two["exchanges"] / args.steps,
        "union_rows_per_exchange": two["union_rows_per_exchange"],
        "store_bytes_per_copy": two["store_bytes"],
        "host_copies": copies,
        "pss_node_bytes": {"1_rank": one["pss_node"], "2_ranks": two["pss_node"]},
        "pss_per_rank_bytes": two["pss_per_rank"], "pss_per_rank_1_rank": one["pss_per_rank"],
        "comparison": cmp,
        "wall_s": time.perf_counter() - t0,
        "exchange_bytes_vs_analytic": (two["exchange_bytes_per_step"] / two["analytic_bytes_per_step"]
                                       if two["analytic_bytes_per_step"] else float("nan")),
        "host_ram_copies_per_node": copies.get("copies_per_node"),
        "two_rank_equal_to_one": cmp["equal"],
    }


def format_md(r: dict, command: str) -> str:
    mib = 2**20
    c = r["comparison"]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in c["max_abs_diff"].items())
    rows = [
        ("step time, 1 rank (s, median)", f"{r['step_s']['1_rank']:.3f}"),
        ("step time, 2 ranks (s, median)", f"{r['step_s']['2_ranks']:.3f}"),
        ("step-time ratio 2 ranks / 1 rank", f"{r['step_time_ratio_2_over_1']:.2f}"),
        ("row-gradient exchange per step and rank (MiB)", f"{r['exchange_bytes_per_step_per_rank'] / mib:.2f}"),
        ("analytic minimum: ids + union rows x 2d x wire bytes (MiB)",
         f"{r['analytic_min_bytes_per_step_per_rank'] / mib:.2f}"),
        ("exchange bytes / analytic minimum", f"{r['exchange_bytes_vs_analytic']:.3f}"),
        ("host copies of the stores per node (memory mappings)", str(r["host_ram_copies_per_node"])),
        ("node PSS, 1 rank / 2 ranks (MiB)",
         f"{r['pss_node_bytes']['1_rank'] / mib:.0f} / {r['pss_node_bytes']['2_ranks'] / mib:.0f}"),
        ("one copy of the stores (MiB)", f"{r['store_bytes_per_copy'] / mib:.0f}"),
        ("2 ranks equal 1 (stated tolerance) / bitwise", f"{r['two_rank_equal_to_one']} / {c['bitwise']}"),
    ]
    return "\n".join([
        f"Command: `{command}`", "",
        f"Model: {r['model']}; adapter: {r['adapter']}; global batch {r['global_batch']}; {r['steps_timed']} timed "
        f"steps after {r['warmup']} warm-up; {r['torch_threads_total']} torch threads in total (split across the "
        f"ranks); CPU gloo, torchrun --standalone; wall {r['wall_s']:.0f} s.", "",
        "| measure | value |", "|---|---|", *[f"| {a} | {v} |" for a, v in rows], "",
        f"- exchanges per step {r['exchanges_per_step']:.0f} (one per adapted layer), mean union rows per exchange "
        f"{r['union_rows_per_exchange']:.0f}; as sent: counts + padded ids + the fp32 [U, 2d] block (fp32 wire "
        f"here, so the block is at the wire dtype; with a bf16 wire the block stays fp32, about 2x the minimum)",
        f"- max |2 ranks - 1 rank| after the last step: {diffs}",
        f"- rows whose update count differs (top-k flips at near-ties): {c['rows_with_other_step_counts']}; the "
        f"other rows equal within the stated tolerance: {c['equal_on_rows_with_equal_step_counts']}",
        "- PSS per rank (2 ranks), MiB (total: anonymous + shared memory + files): " + "; ".join(
            f"{x['Pss'] / mib:.0f}: {x['Pss_Anon'] / mib:.0f} + {x['Pss_Shmem'] / mib:.0f} + {x['Pss_File'] / mib:.0f}"
            for x in r["pss_per_rank_bytes"]) + "; 1 rank: " + "; ".join(
            f"{x['Pss'] / mib:.0f}: {x['Pss_Anon'] / mib:.0f} + {x['Pss_Shmem'] / mib:.0f} + {x['Pss_File'] / mib:.0f}"
            for x in r["pss_per_rank_1_rank"])])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model and store, 2 timed steps (~1 minute)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (last stdout line)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rows", type=int, default=16384, help="adapter rows per layer")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split across the ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in total, split across the ranks")
    args = p.parse_args(argv)
    if args.quick and args.worker is None:  # smaller defaults; options given explicitly still win
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.worker is not None:
        worker(args)
        return {}
    res = measure(args)
    print(format_md(res, "python experiments/bench_distributed.py " + " ".join(sys.argv[1:] if argv is None
                                                                              else argv)))
    if args.json:
        print(json.dumps(res, default=str))
    return res


if __name__ == "__main__":
    main()
