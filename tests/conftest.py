"""Fixtures shared across test modules."""

import json

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Llama + byte-level BPE tokenizer saved as a local HF folder (`tiny/model`), and a 24-record
    QA file (`tiny/train.jsonl`): what the CLI tests train, profile and score. Nothing from a hub."""
    from tests.meft.data.test_records import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"prompt": f"What is the capital of France {i}?", "completion": "Paris"}) + "\n")
    return root
