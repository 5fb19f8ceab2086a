"""The identity of a base model, recorded in an adapter folder so that loading it onto another base is caught.

An adapter's rows are keyed to its base model's FFN inputs: on another model of the same shape (another
fine-tune of the same architecture, another size of the same family with the same width) it loads without
an error and adds to the wrong features. `base_identity(model)` gives
  name              the folder or hub id the model was loaded from (informative only: folders move)
  config_sha256     hash of the model config, without load-time fields (path, dtype, library version)
  tokenizer_sha256  hash of the tokenizer files beside a local model folder (None when there is none)
  weights_sha256    hash of a fixed sample of the embedding matrix, rounded to bfloat16 (so the same weights
                    loaded in float32 or bfloat16, on any device, give the same hash)
and `identity_mismatch` compares two, field by field where both sides have one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

__all__ = ["base_identity", "identity_mismatch"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json")
_LOAD_TIME_KEYS = ("transformers_version", "torch_dtype", "dtype", "use_cache", "architectures")
_SAMPLE_ROWS = 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _config_hash(config) -> str | None:
    if config is None or not hasattr(config, "to_dict"):
        return None
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _LOAD_TIME_KEYS}
    return _sha(json.dumps(d, sort_keys=True, default=str).encode())


def _tokenizer_hash(name: str | None) -> str | None:
    folder = Path(name) if name else None
    if folder is None or not folder.is_dir():
        return None
    files = [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _weights_hash(model) -> str | None:
    try:
        emb = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    if emb.device.type == "meta":
        return None
    n = emb.shape[0]
    idx = torch.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).round().long().to(emb.device)
    sample = emb.detach().index_select(0, idx).to("cpu", torch.bfloat16).view(torch.int16)
    return _sha(sample.numpy().tobytes())


def base_identity(model) -> dict:
    """{"name", "config_sha256", "tokenizer_sha256", "weights_sha256"} of `model` (see module docstring)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or None
    return {"name": name, "config_sha256": _config_hash(config), "tokenizer_sha256": _tokenizer_hash(name),
            "weights_sha256": _weights_hash(model)}


def identity_mismatch(saved: dict | None, now: dict) -> str | None:
    """None when `now` may be the base `saved` describes (or nothing was recorded), else what differs."""
    if not saved:
        return None
    what = {"config_sha256": "its config", "tokenizer_sha256": "its tokenizer files",
            "weights_sha256": "its weights"}
    diffs = [label for key, label in what.items() if saved.get(key) and now.get(key) and saved[key] != now[key]]
    if not diffs:
        return None
    names = f"trained on {saved.get('name')!r}, loading onto {now.get('name')!r}: " if saved.get("name") else ""
    return f"{names}{', '.join(diffs)} differ"
