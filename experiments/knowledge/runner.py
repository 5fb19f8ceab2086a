"""One (method, dataset, seed) run of the knowledge experiment, in its own process.

Owns: building the data (built-in world / fictional facts), the identical batch stream every method
sees (same `BatchIterator` seed, same steps, so the same training tokens), training with one of the
`methods` trainers on packed micro-batches as `meft train` steps (`RunSpec.packing`, decided by
`meft.data.resolve_packing`: the same layout for every method of a run, so the same tokens in the same
order), timing each step, the cell's mid-training checkpoints (`cell_state`: every `save_every` steps, and
`--resume` continues a stopped cell from its last one), scoring exact match on the trained phrasings and on
the held-out phrasings (`meft.evaluate.qa_accuracy`), optionally what it forgot (`forgetting.measure`:
retention of known facts, perplexity on general text; the base model is measured the same way; and the
general-prompt agreement with the base model, `meft.general_agreement`, against the continuations the
untrained model wrote in the same process before training), and
the memory numbers (device-resident training state computed by `device_memory`, and on a GPU the
measured peak of allocated device memory over training; host: peak RSS of this process, and for MEFT
the row stores as `meft.plan.host_ram_bytes` counts them). A run in its own
process gives a clean peak RSS. `spec_key` is the identity of a run in a results file (`--resume`).
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from experiments.knowledge.cell_state import CellCheckpoint, CellStopped, load_cell, save_cell
from experiments.knowledge.methods import build_trainer, device_memory
from meft import general_agreement, general_reference
from meft.data import resolve_packing
from meft.train import lay_out

__all__ = ["RunSpec", "spec_key", "load_facts", "run_one", "eval_base", "CellStopped"]


@dataclass
class RunSpec:
    method: str
    dataset: str = "fictional"     # "fictional" | "world"
    n_facts: int = 200             # fictional: facts; world: countries (4 facts each)
    seed: int = 0                  # training seed (init, batch order); the facts themselves use seed 0
    steps: int = 100
    batch_size: int = 16
    rows: int = 4096               # adapter rows per layer (meft; dense uses the same)
    max_active_rows: int = 1024
    expert_size: int = 32
    lr: float = 1e-3               # AdamW lr: meft rows + router, LoRA, dense
    backbone_lr: float = 1e-3      # AdaLomo lr: meft_adalomo backbone, full_adalomo
    router_lr: float | None = None  # meft router gates; None = lr (a run with its own is reported apart)
    state_dtype: str = "float32"
    chat: bool = False             # chat template (long system prompt) or plain "question answer</s>"
    eval_limit: int = 200
    max_new_tokens: int = 12
    model: str = "default"
    forgetting: bool = False       # also score retention and general-text perplexity (`forgetting.measure`)
    retention_file: str = ""       # the retention set (JSON, built for `model`)
    retention_limit: int = 200     # questions of the set scored
    ppl_texts: int = 64            # pydoc topics scored for perplexity
    ppl_tokens: int = 256          # tokens per topic, at most
    device: str = "cpu"            # where the model trains and is scored ("cuda": MEFT's rows stay on the host)
    replay: int = 0                # self-replay: the base model's answers to this many world-fact questions
                                   # (none about a country of the retention set) join the training records
    packing: str = "auto"          # packed micro-batches as `meft train --packing`: auto (where the model
                                   # takes them) | on | off (the padded step every run used before packing)


# fields added after results existed, with the value every stored spec that lacks them ran with
_BEFORE = {"packing": "off"}


def spec_key(spec: dict) -> tuple:
    """A run's identity in a results file: its spec with every field a stored spec lacks at its default
    (or, for a field in `_BEFORE`, at the value such runs had), so files written before a field existed
    still resume, and a trained run that predates packing never stands for a packed one."""
    full = {**_BEFORE, **spec}
    if full["method"] == "base":  # the untrained model takes no step: its score does not depend on the layout
        full["packing"] = _BEFORE["packing"]
    return tuple(sorted((k, json.dumps(v)) for k, v in asdict(RunSpec(**full)).items()))


def load_facts(spec: RunSpec):
    from meft.data import fictional_facts, world_facts

    if spec.dataset == "fictional":
        return fictional_facts(spec.n_facts, seed=0)
    if spec.dataset == "world":
        return world_facts(max_countries=spec.n_facts, seed=0)
    raise ValueError(f"dataset={spec.dataset!r}: choose 'fictional' or 'world'")


def _splits(facts, limit: int) -> dict[str, list[dict]]:
    """'trained': a sample of the trained (phrasing, fact) records; 'held_out': unseen phrasings."""
    sample = lambda recs: recs if len(recs) <= limit else random.Random(0).sample(recs, limit)
    return {"trained": sample(facts.train), "held_out": sample(facts.eval)}


def _evaluate(model, tok, facts, spec: RunSpec) -> dict:
    from meft.evaluate import qa_accuracy

    out = {}
    for name, recs in _splits(facts, spec.eval_limit).items():
        res = qa_accuracy(model, tok, recs, batch_size=32, max_new_tokens=spec.max_new_tokens, chat=spec.chat)
        out[name] = {"exact_match": res["exact_match"], "contains": res["contains"], "n": res["n"],
                     "examples": [(i["prompt"], i["prediction"], i["answers"][0]) for i in res["items"][:3]]}
    return out


def _load(spec: RunSpec):
    from meft.pretrained import load_model

    torch.manual_seed(spec.seed)
    return load_model(spec.model, dtype=torch.float32, device=spec.device)


def _batches(facts, tok, spec: RunSpec, extra: list[dict] = ()):
    from meft.data import BatchIterator, build_examples

    examples = build_examples(list(facts.train) + list(extra), tok, chat=spec.chat)
    return BatchIterator(examples, spec.batch_size, tok.pad_token_id, seed=spec.seed)


def _replay(model, tok, spec: RunSpec) -> list[dict]:
    """`spec.replay` self-answers of the untrained `model` (`meft.data.replay`), asked in the run's format,
    about countries in neither the retention set nor the quick start's probe (the facts are fictional)."""
    if not spec.replay:
        return []
    from experiments.knowledge.forgetting import load_retention
    from meft.data import replay_prompts
    from meft.train import self_replay_records

    probe = {q["subject"] for q in load_retention(spec.retention_file, spec.model)["questions"]} \
        if spec.retention_file else set()
    prompts = replay_prompts(spec.replay, exclude=probe, seed=0)
    return self_replay_records(model, tok, prompts, chat=spec.chat)


def _forgetting(model, tok, spec: RunSpec) -> dict:
    from experiments.knowledge.forgetting import measure

    return measure(model, tok, retention_file=spec.retention_file, model_name=spec.model,
                   retention_limit=spec.retention_limit, ppl_texts=spec.ppl_texts, ppl_tokens=spec.ppl_tokens)


def eval_base(spec: RunSpec) -> dict:
    """Exact match of the untrained model (the floor every method starts from), and with
    `spec.forgetting` its retention and perplexity (what every run's forgetting is measured against)."""
    model, tok = _load(spec)
    facts = load_facts(spec)
    out = {"spec": asdict(spec), "eval": _evaluate(model, tok, facts, spec), "n_facts": facts.n_facts,
           "n_train_records": len(facts.train), **_gpu(spec)}
    if spec.forgetting:
        out["forgetting"] = _forgetting(model, tok, spec)
    return out


def run_one(spec: RunSpec, ck: CellCheckpoint | None = None) -> dict:
    """Train `spec.method` for `spec.steps` steps on the same batches any method gets; score; measure.
    `ck`: the cell's checkpoint (`cell_state`): saved every `ck.save_every` steps, resumed from with
    `ck.resume`; its `stop_after` hook raises `CellStopped` once that step is saved."""
    model, tok = _load(spec)
    facts = load_facts(spec)
    replayed = _replay(model, tok, spec)  # asked before any adapter exists
    reference = general_reference(model, tok) if spec.forgetting else None  # the untrained model's continuations
    batches = _batches(facts, tok, spec, replayed)
    pack = resolve_packing(spec.packing, model)  # before wrapping: the HF model's own type decides
    tr = build_trainer(spec.method, model, seed=spec.seed, rows=spec.rows, max_active_rows=spec.max_active_rows,
                       expert_size=spec.expert_size, lr=spec.lr, backbone_lr=spec.backbone_lr,
                       state_dtype=spec.state_dtype, router_lr=spec.router_lr, pack=pack)
    prog = _train(tr, batches, spec, ck)
    mem = device_memory(tr)
    if prog.pop("cuda_peak"):  # measured, beside the computed state: weights + state + activations + allocator slack
        mem["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    host_stores = _meft_host_bytes(tr)
    ev = _evaluate(tr.model, tok, facts, spec)
    forgot = _forgetting(tr.model, tok, spec) if spec.forgetting else None
    if forgot is not None:
        agree = general_agreement(tr.model, reference)
        forgot["general"] = {k: agree[k] for k in ("agreement", "n_prompts", "n_tokens")}
    tr.close()
    step_s, losses = prog["step_s"], prog["losses"]
    timed = step_s[2:] if len(step_s) > 4 else step_s  # first steps warm up (numba, allocator)
    return {"spec": asdict(spec), "n_facts": facts.n_facts, "n_train_records": len(facts.train),
            "n_replayed": len(replayed), "epochs": spec.steps * spec.batch_size / (len(facts.train) + len(replayed)),
            "packed": pack, "labelled_tokens": prog["labelled"], "input_tokens": prog["input_tokens"],
            "computed_tokens": prog["computed_tokens"], "first_loss": losses[0],
            "last_loss": statistics.fmean(losses[-5:]), "losses": losses,
            "step_s_median": statistics.median(timed), "train_s": prog["train_s"],
            "checkpoint_s": prog["checkpoint_s"], "resumed_from_step": prog["resumed_from_step"], "device": mem,
            "host_stores_bytes": host_stores, "peak_rss_bytes": _peak_rss(), "eval": ev, **_gpu(spec),
            **({"forgetting": forgot} if forgot is not None else {})}


def _train(tr, batches, spec: RunSpec, ck: CellCheckpoint | None) -> dict:
    """The training steps of a cell, from its checkpoint when `ck` resumes one; returns the progress (every
    step's loss and time, tokens, seconds of training and of checkpoint writes; "cuda_peak": whether the
    device's peak memory was measured). Tokens: `input_tokens` real tokens of the padded batches (the same
    for every layout), `computed_tokens` positions the model ran (the packed sequence, or the padded batch)."""
    spec_d = asdict(spec)
    prog = (load_cell(ck, tr, batches, spec_d) if ck is not None else None) or {
        "step": 0, "losses": [], "step_s": [], "labelled": 0, "input_tokens": 0, "computed_tokens": 0,
        "train_s": 0.0, "checkpoint_s": 0.0}
    prog["resumed_from_step"] = prog["step"]
    cuda = torch.device(spec.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(prog["step"] + 1, spec.steps + 1):
        t_step = time.perf_counter()
        batch = next(batches)
        prog["input_tokens"] += int(batch["attention_mask"].sum())
        prog["computed_tokens"] += _computed(tr, batch)
        t0 = time.perf_counter()
        loss, n = tr.step(batch)  # returns a Python float: the step's device work is done when it returns
        prog["step_s"].append(time.perf_counter() - t0)
        prog["losses"].append(loss)
        prog["labelled"] += n
        prog["step"] = step
        prog["train_s"] += time.perf_counter() - t_step
        if ck is not None and ck.due(step, spec.steps):
            t_save = time.perf_counter()
            save_cell(ck, tr, batches, spec_d, {k: v for k, v in prog.items() if k != "resumed_from_step"})
            prog["checkpoint_s"] += time.perf_counter() - t_save
            if step == ck.stop_after:
                tr.close()
                raise CellStopped(f"stopped after step {step} of {spec.steps} (checkpoint in {ck.folder})")
    prog["cuda_peak"] = cuda  # over this process's steps (a resumed cell: the steps after its checkpoint)
    return prog


def _computed(tr, batch: dict) -> int:
    """Positions the model computes for `batch`: its packed length when the trainer packs it, else B x T."""
    if tr.pack:
        packed = lay_out(tr.inner, batch, True)
        return int(packed["input_ids"].numel())
    return int(batch["input_ids"].numel())


def _gpu(spec: RunSpec) -> dict:
    """{"gpu": its name} for a run on a CUDA device, else {} (a CPU run's results keep their old shape)."""
    return {"gpu": torch.cuda.get_device_name(spec.device)} if torch.device(spec.device).type == "cuda" else {}


def _meft_host_bytes(tr) -> int:
    if tr.rt is None:
        return 0
    from meft.plan import host_ram_bytes

    return host_ram_bytes(tr.rt.config, len(tr.rt.adapters), tr.rt.adapters[0].d)["total"]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
