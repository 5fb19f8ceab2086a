"""The end-of-run summary of `meft train`: summary.json's numbers and the table printed after training
(accuracy before / after, a few example answers, the loss and the locality term, steps, tokens, time and traffic)."""

from __future__ import annotations

from offload.text import format_table

__all__ = ["run_summary", "summary_table"]


def run_summary(args, cfg, rt, records, before, after, train_s, interrupted) -> dict:
    rep = rt.meter.report() if rt.meter is not None else {}
    tot = rep.get("totals", {})
    tokens = sum(r["tokens"] for r in records)
    return {
        "steps": records[-1]["step"] if records else 0, "interrupted": interrupted,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None,
        # the locality term (MeftConfig.locality_weight > 0), unweighted, at the first and last step
        "first_locality": records[0].get("locality") if records else None,
        "last_locality": records[-1].get("locality") if records else None,
        "train_seconds_this_session": train_s, "tokens": tokens,
        "bytes_down": tot.get("h2d", {}).get("bytes", 0), "bytes_up": tot.get("d2h", {}).get("bytes", 0),
        "before": {k: {m: v[m] for m in ("exact_match", "contains", "n", "examples")} for k, v in before.items()},
        "after": {k: {m: v[m] for m in ("exact_match", "contains", "n", "examples")} for k, v in after.items()},
        "parameters": rt.summary(),
    }


def summary_table(s: dict) -> str:
    rows = []
    for split in sorted(set(s["before"]) | set(s["after"])):
        for metric in ("exact_match", "contains"):
            b = s["before"].get(split, {}).get(metric)
            a = s["after"].get(split, {}).get(metric)
            rows.append([f"{split} {metric}", "-" if b is None else f"{b:.1%}", "-" if a is None else f"{a:.1%}"])
    rows.append(["loss (first -> last step)", _num(s["first_loss"]), _num(s["last_loss"])])
    if s.get("last_locality") is not None:
        rows.append(["locality term (first -> last step)", _num(s["first_locality"]), _num(s["last_locality"])])
    head = format_table(rows, ["metric", "before", "after"]) + _examples_table(s)
    info = format_table([
        ["steps", s["steps"]], ["tokens (padding excluded)", s["tokens"]],
        ["train time (s)", round(s["train_seconds_this_session"], 1)],
        ["MB rows down (host->device)", round(s["bytes_down"] / 1e6, 1)],
        ["MB grads up (device->host)", round(s["bytes_up"] / 1e6, 1)],
    ], ["run", "value"])
    return "\n" + head + "\n\n" + info + ("\n(interrupted: resume with --resume)" if s["interrupted"] else "")


def _examples_table(s: dict, n: int = 5) -> str:
    """A few evaluation questions with the expected answer and the model's answer before and after."""
    split = "held_out" if "held_out" in s["after"] else next(iter(s["after"]), None)
    if split is None or split not in s["before"]:
        return ""
    before, after = s["before"][split]["examples"], s["after"][split]["examples"]
    rows = [[str(b["prompt"])[:48], b["answers"][0][:20], str(b["prediction"])[:36], str(a["prediction"])[:36]]
            for b, a in zip(before[:n], after[:n])]
    return f"\n\nexamples ({split}):\n" + format_table(rows, ["question", "expected", "before", "after"])


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
