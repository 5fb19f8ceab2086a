"""What every section of the GPU validation kit shares: a seeded random Llama of a given shape built on
the device (nothing from a hub), its batches, `meft.wrap` tolerant of fields a build lacks, the
tolerance comparison, short source paths for call sites, and giving memory back between runs.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root
TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=256, tie=True)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def llama(dev: str, dtype, *, hidden, inter, layers, heads, kv, vocab, tie, seed=0):
    """LlamaForCausalLM of this shape with seeded random weights, built on `dev` (nothing from a hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(dev):
        return LlamaForCausalLM(cfg).to(dtype)


def batch(dev: str, vocab: int, b: int, t: int, seed: int = 1) -> dict:
    ids = torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed)).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def wrap(model, **kw):
    """meft.wrap(model, MeftConfig(**kw)) minus the fields this build lacks; -> (runtime, dropped fields)."""
    import meft

    known = {f.name for f in dataclasses.fields(meft.MeftConfig)}
    meft.wrap(model, meft.MeftConfig(**{k: v for k, v in kw.items() if k in known}))
    return model.meft, sorted(set(kw) - known)


def short(path: str) -> str:
    p = Path(path).resolve()
    if "site-packages" in p.parts:
        return "/".join(p.parts[p.parts.index("site-packages") + 1:])
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def compare(a, b, tol) -> tuple[float, bool]:
    """(max abs diff, torch.testing.assert_close(a[i], b[i], **tol) holds for every i)."""
    a, b = [x.float().cpu() for x in a], [y.float().cpu() for y in b]
    diff = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    try:
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **tol)
        return diff, True
    except (AssertionError, ValueError):
        return diff, False


def release(model=None) -> None:
    """Unwrap (closes the runtime: scheduler threads, pending updates) and give memory back."""
    import meft

    if hasattr(model, "meft"):
        meft.unwrap(model)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # cached pinned blocks back to CUDA
