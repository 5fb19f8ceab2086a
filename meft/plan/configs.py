"""Model configs `meft plan` can take by name, and loading a config from a name, file or folder.

Owns the shipped config facts (`meft/configs/*.json`: the published `config.json` values of
Llama-2-7B, Mistral-7B-v0.1 and Meta-Llama-3-8B -- architecture numbers only, no weights) and the
lookup `load_model_config(spec)`: a known name (or its hub id), a `config.json` path, or an HF folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["KNOWN_CONFIGS", "load_model_config", "config_dict"]

# name -> (file in meft/configs, hub ids and other spellings accepted for it)
KNOWN_CONFIGS = {
    "llama-2-7b": ("llama-2-7b.json", ("meta-llama/Llama-2-7b-hf", "llama2-7b", "llama-2-7b-hf")),
    "mistral-7b": ("mistral-7b.json", ("mistralai/Mistral-7B-v0.1", "mistral-7b-v0.1")),
    "llama-3-8b": ("llama-3-8b.json", ("meta-llama/Meta-Llama-3-8B", "llama3-8b", "meta-llama-3-8b")),
}


def _known_name(spec: str) -> str | None:
    low = spec.lower()
    for name, (_, aliases) in KNOWN_CONFIGS.items():
        if low == name or low in (a.lower() for a in aliases):
            return name
    return None


def config_dict(spec: str) -> tuple[str, dict]:
    """(display name, config.json dict) for a known name, a config.json file or an HF folder."""
    name = _known_name(spec)
    if name is not None:
        text = resources.files("meft.configs").joinpath(KNOWN_CONFIGS[name][0]).read_text()
        return name, json.loads(text)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {spec!r}: not a known config ({', '.join(KNOWN_CONFIGS)}), nor a "
                         f"config.json file or an HF folder holding one; fix: pass one of those")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model {spec!r}: {path} is not valid JSON ({exc})") from exc
    if "model_type" not in data:
        raise ValueError(f"--model {spec!r}: {path} has no 'model_type'; pass an HF config.json")
    return str(path.parent.name if path.name == "config.json" else path.stem), data


def load_model_config(spec: str):
    """(display name, transformers PretrainedConfig) for `spec` (see `config_dict`)."""
    from transformers import AutoConfig

    name, data = config_dict(spec)
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return name, AutoConfig.for_model(data.pop("model_type"), **data)
