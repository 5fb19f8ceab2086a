"""meft.data.records and meft.data.builtin: validation with file:line errors, chat-template tokenization
with completion-only labels, packing, collation, the resumable batch iterator, built-in datasets.

Also holds the tiny local tokenizer / model builders the other meft tests import (nothing from a hub).
"""

import json
import time

import numpy as np
import pytest
import torch

from meft.data.builtin import fictional_facts, load_builtin, world_facts
from meft.data.records import (
    IGNORE_INDEX,
    BatchIterator,
    DataError,
    build_examples,
    collate,
    encode_record,
    load_jsonl,
    pack_texts,
    prompt_ids,
    tokenize_records,
    with_system_prompt,
)
from meft.data.sources import resolve_system_prompt
from meft.pretrained import CHATML_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What is the capital of France? Paris", "Which city is the capital of Peru? Lima",
    "The quick brown fox jumps over the lazy dog.", "system user assistant You are a helpful AI assistant",
    "named SmolLM, trained by Hugging Face", "Where was Kalo Mira born? Venton 0123456789 +33 .fr EUR",
]


def tiny_tokenizer(chat: bool = True):
    """Byte-level BPE trained on a few strings, ChatML specials, optional ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32, init_range: float = 0.2):
    """Tiny Llama; init_range 0.2 (not 0.02) so greedy outputs depend on the prompt instead of
    repeating one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init_range,
                      bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- validation

BAD = {
    "invalid_json": ('{"prompt": "a", "completion": ', "invalid JSON"),
    "not_object": ('["prompt", "completion"]', "expected a JSON object"),
    "no_known_key": ('{"question": "a", "answer": "b"}', "none of the keys"),
    "two_formats": ('{"prompt": "a", "completion": "b", "text": "c"}', "several of"),
    "prompt_not_str": ('{"prompt": 3, "completion": "b"}', "'prompt' is int"),
    "missing_completion": ('{"prompt": "a"}', "'completion' is NoneType"),
    "empty_completion": ('{"prompt": "a", "completion": "  "}', "'completion' is empty"),
    "messages_not_list": ('{"messages": "hi"}', "non-empty list"),
    "bad_role": ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role is 'bot'"),
    "content_not_str": ('{"messages": [{"role": "user", "content": 1}]}', "messages[0].content is int"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    "empty_text": ('{"text": ""}', "'text' must be a non-empty string"),
    "bad_answers": ('{"prompt": "a", "completion": "b", "answers": "b"}', "'answers' must be"),
}
GOOD_QA = '{"prompt": "What is the capital of France?", "completion": "Paris"}'
GOOD_CHAT = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
GOOD_TEXT = '{"text": "hello"}'


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_malformed_kind_reports_file_and_line(tmp_path, kind):
    line, reason = BAD[kind]
    good = GOOD_CHAT if '"messages"' in line else GOOD_TEXT if line.startswith('{"text"') else GOOD_QA
    path = _write(tmp_path, [good, "", line, good])  # bad record on line 3, in the file's format
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{path}:3: ")
    assert reason in info.value.errors[0]
    assert f"{path}:3:" in str(info.value)


def test_all_errors_collected_in_one_refusal(tmp_path):
    lines = [GOOD_QA] + [BAD[k][0] for k in sorted(BAD)]
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    got_lines = [int(e[len(str(path)) + 1:].split(":")[0]) for e in info.value.errors]
    assert got_lines == list(range(2, 2 + len(BAD)))
    assert isinstance(info.value, ValueError)


def test_mixing_text_and_qa_refused(tmp_path):
    path = _write(tmp_path, [GOOD_QA, '{"text": "hello"}'])
    with pytest.raises(DataError, match=r":2: a text record, but this file holds prompt_completion records "
                                        r"\(1 of them, first at .*:1\)"):
        load_jsonl(path)


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_jsonl(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_valid_file_loads_with_sources(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = _write(tmp_path, [json.dumps(msgs), "", json.dumps(msgs)])
    recs = load_jsonl(path)
    assert [r["_source"] for r in recs] == [f"{path}:1", f"{path}:3"]
    assert recs[0]["messages"] == msgs["messages"] and recs[0]["_format"] == "messages"


# ----------------------------------------------------------------------------- tokenization

def _labelled(ex):
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_qa_chat_template_completion_only(tok):
    rec = {"prompt": "What is the capital of France?", "completion": "Paris"}
    ex = encode_record(rec, tok)
    msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": "Paris"}]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    p = prompt_ids(rec, tok)
    assert ex["input_ids"][:len(p)] == p
    assert ex["labels"][:len(p)] == [IGNORE_INDEX] * len(p)
    assert ex["labels"][len(p):] == ex["input_ids"][len(p):]
    assert tok.decode(_labelled(ex)) == "Paris<|im_end|>\n"
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    full = encode_record(rec, tok, completion_only=False)
    assert full["labels"] == full["input_ids"] == ex["input_ids"]


def test_messages_loss_on_every_assistant_turn(tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital?"},
                        {"role": "assistant", "content": "Paris"}]}
    ex = encode_record(rec, tok)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert tok.decode(_labelled(ex)) == "Hello<|im_end|>\nParis<|im_end|>\n"
    assert tok.decode(prompt_ids(rec, tok)).endswith("Capital?<|im_end|>\n<|im_start|>assistant\n")


def test_system_prompt_goes_first_where_none_is_given(tok):
    qa = {"prompt": "What is the capital of France?", "completion": "Paris"}
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    own = {"messages": [{"role": "system", "content": "Mine."}, *chat["messages"]]}
    assert with_system_prompt([qa, chat, own], None) == [qa, chat, own]
    qa_s, chat_s, own_s = with_system_prompt([qa, chat, own], "")
    assert own_s == own and "system" not in qa  # the inputs are not modified
    default = tok.decode(encode_record(qa, tok)["input_ids"])
    assert "You are a helpful AI assistant" in default  # the template's own system prompt
    for rec, user in ((qa_s, qa["prompt"]), (chat_s, "Hi")):
        ex = encode_record(rec, tok)
        text = tok.decode(ex["input_ids"])
        assert text.startswith(f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{user}<|im_end|>")
        p = prompt_ids(rec, tok)
        assert ex["input_ids"][:len(p)] == p and ex["labels"][:len(p)] == [IGNORE_INDEX] * len(p)
    assert len(encode_record(qa_s, tok)["input_ids"]) < len(encode_record(qa, tok)["input_ids"])
    brief = with_system_prompt([qa], "Be brief.")[0]
    assert tok.decode(prompt_ids(brief, tok)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_resolve_system_prompt(tok):
    assert resolve_system_prompt("auto", tok, builtin=True) == ""
    assert resolve_system_prompt("auto", tok, builtin=False) is None
    assert resolve_system_prompt("model", tok, builtin=True) is None
    assert resolve_system_prompt("Be brief.", tok, builtin=False) == "Be brief."
    plain = tiny_tokenizer(chat=False)
    assert resolve_system_prompt("auto", plain, builtin=True) is None
    with pytest.raises(ValueError, match="--system-prompt 'Be brief.'.*no chat template.*fix"):
        resolve_system_prompt("Be brief.", plain, builtin=False)


def test_without_chat_template_prompt_completion_eos():
    tok = tiny_tokenizer(chat=False)
    ex = encode_record({"prompt": "The capital of France is", "completion": " Paris"}, tok)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(_labelled(ex)) == " Paris<|im_end|>"
    assert tok.decode(ex["input_ids"]) == "The capital of France is Paris<|im_end|>"
    with pytest.raises(ValueError, match="chat_template"):
        prompt_ids({"messages": [{"role": "assistant", "content": "x"}]}, tok)


def test_truncation_that_leaves_no_answer_is_refused(tok):
    recs = [{"prompt": "What is the capital of France?", "completion": "Paris", "_source": "f.jsonl:7"}]
    short = tokenize_records(recs, tok, max_length=1000)
    assert len(short) == 1
    with pytest.raises(DataError, match="f.jsonl:7: no answer token left within max_length=5"):
        tokenize_records(recs, tok, max_length=5)


def test_packing_blocks(tok):
    texts = ["The quick brown fox jumps over the lazy dog."] * 5 + ["Paris Lima"]
    blocks = pack_texts(texts, tok, block_size=16)
    stream = []
    for t in texts:
        stream += tok(t)["input_ids"] + [tok.eos_token_id]
    assert [t for b in blocks for t in b["input_ids"]] == stream[: sum(len(b["input_ids"]) for b in blocks)]
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 16
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert build_examples([{"text": t} for t in texts], tok, block_size=16) == blocks
    with pytest.raises(ValueError, match="block_size"):
        pack_texts(texts, tok, block_size=1)


def test_collate_right_pads(tok):
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(exs, pad_token_id=2, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


# ----------------------------------------------------------------------------- batch iterator

def _examples(n):
    return [{"input_ids": [i + 3] * (1 + i % 3), "labels": [i + 3] * (1 + i % 3)} for i in range(n)]


def _firsts(batch):
    return [int(x) - 3 for x in batch["input_ids"][:, 0]]


def test_iterator_epochs_cover_each_example_once_and_reshuffle():
    it = BatchIterator(_examples(10), 3, pad_token_id=0, seed=1)
    assert it.batches_per_epoch == 4
    e0 = [i for _ in range(4) for i in _firsts(next(it))]
    e1 = [i for _ in range(4) for i in _firsts(next(it))]
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["index"] == 4
    again = BatchIterator(_examples(10), 3, pad_token_id=0, seed=1)
    assert [i for _ in range(4) for i in _firsts(next(again))] == e0
    other = BatchIterator(_examples(10), 3, pad_token_id=0, seed=2)
    assert [i for _ in range(4) for i in _firsts(next(other))] != e0


def test_group_by_length_pads_less_and_still_covers_each_example_once():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 40, (200,), generator=rng).tolist()
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    padded = {}
    for grouped in (False, True):
        it = BatchIterator(examples, 8, pad_token_id=0, seed=3, group_by_length=grouped)
        seen, cells = [], 0
        for _ in range(2 * it.batches_per_epoch):
            b = next(it)
            cells += b["input_ids"].numel()
            seen += [len(r) - int((r == 0).sum()) for r in b["input_ids"]]
        assert sorted(seen) == sorted(lengths * 2)  # two epochs: every example once per epoch
        padded[grouped] = cells - 2 * sum(lengths)
    assert padded[True] < 0.2 * padded[False]
    a = BatchIterator(examples, 8, pad_token_id=0, seed=3, group_by_length=True)
    assert not np.array_equal(a.order(0), a.order(1)) and np.array_equal(a.order(1), a.order(1))
    assert sorted(a.order(0).tolist()) == list(range(200))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("stop", [1, 3, 4, 6])
def test_iterator_resume_is_exact(stop, grouped):
    kw = {"seed": 5, "drop_last": True, "group_by_length": grouped}
    ref = BatchIterator(_examples(7), 2, pad_token_id=0, **kw)
    uninterrupted = [next(ref)["input_ids"] for _ in range(10)]
    first = BatchIterator(_examples(7), 2, pad_token_id=0, **kw)
    got = [next(first)["input_ids"] for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = BatchIterator(_examples(7), 2, pad_token_id=0, **kw)
    resumed.load_state_dict(state)
    got += [next(resumed)["input_ids"] for _ in range(10 - stop)]
    for a, b in zip(got, uninterrupted):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="same data and seed"):
        BatchIterator(_examples(8), 2, pad_token_id=0, seed=5).load_state_dict(state)


def test_iterator_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(_examples(3), 0, pad_token_id=0)
    with pytest.raises(ValueError, match="no training examples"):
        BatchIterator([], 2, pad_token_id=0)


# ----------------------------------------------------------------------------- built-in data

def test_world_facts_splits():
    t0 = time.perf_counter()
    fs = world_facts()
    assert time.perf_counter() - t0 < 5.0
    assert fs.n_facts > 600 and len(fs.train) == 3 * fs.n_facts and len(fs.eval) == fs.n_facts
    train_prompts = {r["prompt"] for r in fs.train}
    assert not any(r["prompt"] in train_prompts for r in fs.eval)  # eval phrasings never trained
    answers = fs.answers
    for r in fs.eval:
        assert answers[(r["subject"], r["relation"])] == r["answers"] and r["completion"] == r["answers"][0]
        assert 0 < len(r["completion"].split()) <= 4
    fr = {(r["subject"], r["relation"]): r["completion"] for r in fs.train}
    assert fr[("France", "capital")] == "Paris" and fr[("France", "calling_code")] == "+33"
    assert fr[("France", "currency")] == "EUR" and fr[("Japan", "region")] == "Asia"
    assert "Antarctica" not in {r["subject"] for r in fs.train}  # no capital: filtered
    small = world_facts(("capital", "tld"), max_countries=10, seed=3)
    assert small.n_facts == 20
    assert small.train == world_facts(("capital", "tld"), max_countries=10, seed=3).train
    with pytest.raises(ValueError, match="unknown"):
        world_facts(("capital", "anthem"))


@pytest.mark.parametrize("n", [1, 7, 250])
def test_fictional_facts_size_and_seed(n):
    fs = fictional_facts(n, seed=4)
    assert fs.n_facts == n and len(fs.eval) == n and len(fs.train) == 3 * n
    assert fs.train == fictional_facts(n, seed=4).train
    assert fs.train != fictional_facts(n, seed=5).train
    train_prompts = {r["prompt"] for r in fs.train}
    assert not any(r["prompt"] in train_prompts for r in fs.eval)
    assert load_builtin("fictional_facts", n=n, seed=4).eval == fs.eval
    with pytest.raises(ValueError, match="unknown built-in"):
        load_builtin("trivia")


def test_builtin_records_tokenize(tok):
    exs = build_examples(fictional_facts(20, seed=0).train, tok)
    assert len(exs) == 60 and all(any(t != IGNORE_INDEX for t in e["labels"]) for e in exs)
