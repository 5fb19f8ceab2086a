"""Training data: tokenization with completion-only labels, packing, collation, and a resumable
shuffled batch iterator, over canonical records:

* ``{"prompt": str, "completion": str}``   QA / instruction pairs; loss on the completion only by default
  (optional ``"system"``: the conversation's system message, see `with_system_prompt`).
* ``{"messages": [{"role", "content"}, ...]}``   chat; loss on the assistant messages only by default.
* ``{"text": str}``   plain text; packed into fixed-length blocks, loss on every token.

Optional ``"answers": [str, ...]`` on a QA record lists the accepted answers for evaluation
(`meft.evaluate`). Reading files and turning Alpaca / ShareGPT / OpenAI records into these is
`meft.data.files` and `meft.data.formats` (`load_jsonl`, `DataError`, `validate_record` and
`records_kind` are re-exported here for older callers).

Tokenization renders the chat template (instruct tokenizers, i.e. ``tokenizer.chat_template`` set) to a
string and tokenizes the prompt part and each supervised part separately, so the label boundary is
exact and the prompt tokens are exactly what generation sees. Labels are ``-100`` where no loss is taken
(the HF convention; the model shifts labels internally).

Built-in datasets live in `meft.data.builtin`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from meft.data.files import load_jsonl, load_records
from meft.data.formats import DataError, records_kind, validate_record

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "load_jsonl",
    "load_records",
    "validate_record",
    "records_kind",
    "uses_chat_template",
    "with_system_prompt",
    "prompt_ids",
    "reference_answers",
    "encode_record",
    "tokenize_records",
    "pack_texts",
    "build_examples",
    "collate",
    "BatchIterator",
]

IGNORE_INDEX = -100
_LENGTH_GROUP = 16  # group_by_length: batches per group sorted by length (HF Trainer uses 50)


# ----------------------------------------------------------------------------- tokenization

def uses_chat_template(tokenizer, chat: bool | None = None) -> bool:
    """`chat` if given, else whether the tokenizer has a chat template (instruct models)."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _as_messages(rec: dict) -> list[dict]:
    if "messages" in rec:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    system = [{"role": "system", "content": rec["system"]}] if rec.get("system") is not None else []
    return system + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def with_system_prompt(records: Sequence[dict], text: str | None) -> list[dict]:
    """Copies of QA/chat `records` whose conversation starts with the system message `text` where it had none.

    `text=None` returns the records unchanged (the chat template then adds its own default, if any:
    SmolLM2's is "You are a helpful AI assistant named SmolLM, trained by Hugging Face", 20 tokens);
    `text=""` gives an empty system turn. A record that carries a system message keeps it. A
    prompt/completion record gets ``"system"``; a messages record gets a leading system message.
    """
    if text is None:
        return list(records)
    out = []
    for rec in records:
        if "messages" in rec:
            if rec["messages"] and rec["messages"][0]["role"] == "system":
                out.append(rec)
            else:
                out.append({**rec, "messages": [{"role": "system", "content": text}, *rec["messages"]]})
        elif "prompt" in rec and rec.get("system") is None:
            out.append({**rec, "system": text})
        else:
            out.append(rec)
    return out


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_ids(rec: dict, tokenizer, chat: bool | None = None) -> list[int]:
    """Token ids a model is given to answer `rec`: the prompt (QA) or every message before the last
    assistant message (chat), with the chat template and its generation prompt when `chat`."""
    if uses_chat_template(tokenizer, chat):
        msgs = _as_messages(rec)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return _ids(tokenizer, _render(tokenizer, msgs[:last], True))
    if "messages" in rec:
        raise ValueError("'messages' records need a tokenizer with a chat_template; fix: use an instruct "
                         "model or prompt/completion records")
    return _ids(tokenizer, rec["prompt"], special=True)


def reference_answers(rec: dict) -> list[str]:
    """Accepted answers: ``rec["answers"]``, else the completion / last assistant message."""
    if rec.get("answers"):
        return list(rec["answers"])
    if "messages" in rec:
        return [[m for m in rec["messages"] if m["role"] == "assistant"][-1]["content"]]
    return [rec["completion"]]


def _encode_chat(rec: dict, tokenizer, completion_only: bool) -> tuple[list[int], list[int]]:
    msgs = _as_messages(rec)
    ids, labels, done = [], [], ""
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], True)
        upto = _render(tokenizer, msgs[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ValueError("the chat template does not render conversations prefix-consistently, so "
                             "assistant tokens cannot be located; fix: pass chat=False or fix the template")
        context = _ids(tokenizer, before[len(done):])
        answer = _ids(tokenizer, upto[len(before):])
        ids += context + answer
        labels += [IGNORE_INDEX if completion_only else t for t in context] + answer
        done = upto
    return ids, labels


def encode_record(rec: dict, tokenizer, *, chat: bool | None = None,
                  completion_only: bool = True) -> dict[str, list[int]]:
    """Tokenize one QA/chat record: ``{"input_ids", "labels"}`` (labels -100 outside the answers when
    `completion_only`). Without a chat template a QA record is ``prompt + completion + eos``."""
    if uses_chat_template(tokenizer, chat):
        ids, labels = _encode_chat(rec, tokenizer, completion_only)
    else:
        context = prompt_ids(rec, tokenizer, chat=False)
        answer = _ids(tokenizer, rec["completion"]) + [tokenizer.eos_token_id]
        ids = context + answer
        labels = [IGNORE_INDEX if completion_only else t for t in context] + answer
    return {"input_ids": ids, "labels": labels}


def tokenize_records(records: Sequence[dict], tokenizer, *, chat: bool | None = None,
                     completion_only: bool = True, max_length: int | None = None) -> list[dict]:
    """Encode QA/chat records; with `max_length`, truncate and refuse records left with no labelled token."""
    out, errors = [], []
    for i, rec in enumerate(records):
        ex = encode_record(rec, tokenizer, chat=chat, completion_only=completion_only)
        if max_length is not None:
            ex = {k: v[:max_length] for k, v in ex.items()}
        if all(t == IGNORE_INDEX for t in ex["labels"]):
            where = rec.get("_source", f"record {i}")
            full = len(encode_record(rec, tokenizer, chat=chat)["input_ids"])
            errors.append(f"{where}: no answer token left within max_length={max_length} "
                          f"(record has {full} tokens); "
                          "fix: raise max_length or shorten the prompt")
            continue
        out.append(ex)
    if errors:
        raise DataError(errors, what="tokenized records")
    return out


def pack_texts(texts: Sequence[str], tokenizer, block_size: int) -> list[dict]:
    """Concatenate ``text + eos`` for every text and cut into blocks of `block_size` tokens (the last
    block may be shorter); labels equal input ids."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size={block_size!r}: must be an int >= 2; fix: pass e.g. 512")
    stream: list[int] = []
    for text in texts:
        stream += _ids(tokenizer, text, special=True) + [tokenizer.eos_token_id]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]


def build_examples(records: Sequence[dict], tokenizer, *, chat: bool | None = None,
                   completion_only: bool = True, max_length: int | None = None,
                   block_size: int = 512) -> list[dict]:
    """Records of one kind -> training examples: QA/chat tokenized, text packed into `block_size` blocks."""
    if records_kind(records) == "text":
        return pack_texts([r["text"] for r in records], tokenizer, block_size)
    return tokenize_records(records, tokenizer, chat=chat, completion_only=completion_only,
                            max_length=max_length)


# ----------------------------------------------------------------------------- batching

def collate(examples: Sequence[dict], pad_token_id: int, *,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors, each ``[B, T]``."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; fix: set tokenizer.pad_token (e.g. to the eos token)")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)       # [B, T]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)   # [B, T]
    mask = torch.zeros((len(examples), width), dtype=torch.long)                  # [B, T]
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchIterator:
    """Endless iterator of collated batches over `examples`, reshuffled every epoch.

    The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``, so it
    depends only on (seed, epoch). The position is ``(epoch, index)`` (``index`` = batches already
    yielded this epoch); `state_dict` / `load_state_dict` save and restore it, so a resumed run sees
    exactly the batches an uninterrupted run would. With `drop_last` the last short batch of an epoch
    is skipped.
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, pad_token_id: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, pad_to_multiple_of: int | None = None,
                 group_by_length: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
        if not examples:
            raise ValueError("no training examples; fix: check the data file / built-in dataset")
        if drop_last and len(examples) < batch_size:
            raise ValueError(f"drop_last with {len(examples)} examples < batch_size={batch_size} yields "
                             "no batch; fix: lower batch_size or set drop_last=False")
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.pad_to_multiple_of, self.group_by_length = pad_to_multiple_of, group_by_length
        self._lengths = np.array([len(e["input_ids"]) for e in examples])  # [N]
        self.epoch, self.index = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch`, ``[N]``.

        `group_by_length` (as HF Trainer's option of that name): the shuffled examples are cut into groups of
        `_LENGTH_GROUP` batches, each group sorted by length and cut into batches, and the full batches are
        shuffled (the short last batch stays last). A batch then holds examples of about one length, so
        little of it is padding, and every epoch still sees every example once, in a new order."""
        if not self.shuffle:
            return np.arange(len(self.examples))
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.examples))  # [N]
        if not self.group_by_length:
            return perm
        group = _LENGTH_GROUP * self.batch_size
        perm = np.concatenate([g[np.argsort(-self._lengths[g], kind="stable")]
                               for g in np.split(perm, range(group, len(perm), group))])
        n_full = len(perm) // self.batch_size
        batches = perm[:n_full * self.batch_size].reshape(n_full, self.batch_size)  # [n_full, B]
        return np.concatenate([batches[rng.permutation(n_full)].reshape(-1), perm[n_full * self.batch_size:]])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.examples[i] for i in idx], self.pad_token_id,
                       pad_to_multiple_of=self.pad_to_multiple_of)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_examples", len(self.examples)) != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for {state.get('n_examples')} examples with seed {state['seed']}, "
                f"but this run has {len(self.examples)} examples with seed {self.seed}; fix: resume with "
                "the same data and seed"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
