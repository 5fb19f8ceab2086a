"""What a run forgot: retention of facts the base model knows, and perplexity on general text.

Owns the two forgetting probes every capacity run (and its base model) is scored on, both fixed so
that every run scores exactly the same thing:

* **Retention**: a committed JSON set (`RETENTION_FILE`, built once by `build_retention_set`) of at
  most 200 world-fact questions (`meft.data.world_facts`, relations capital / region / currency /
  demonym, each fact in its first, most natural phrasing) that the untrained default model answers
  correctly. None of them is in the training data (the capacity runs train on fictional facts only).
  The base model answers in sentences ("The capital of Peru is Lima."), so its *exact* match is 0 on
  every phrasing and format tried (48 questions: 0.0 plain and chat): "answers correctly" is therefore
  `meft.evaluate`'s *contains* match (the normalised accepted answer occurs as whole words in the
  normalised answer), asked through the chat template with 24 new tokens, and retention is the
  contains rate on the set. Exact match is recorded as well.
* **Perplexity** (`meft.evaluate.perplexity`) on the documentation text that ships inside Python
  (`pydoc_data.topics`): the first `n` topics in name order with at least 500 characters, each cut to
  at most `max_tokens` tokens (at a token boundary). The texts depend on the Python version: their
  SHA-256 is stored with every result, and the report only compares runs with the base model's
  measurement of the same texts.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

__all__ = ["RETENTION_FILE", "RETENTION_RELATIONS", "build_retention_set", "load_retention", "general_texts",
           "measure"]

RETENTION_FILE = Path(__file__).with_name("retention_default.json")  # the default model's set (committed)
RETENTION_RELATIONS = ("capital", "region", "currency", "demonym")
_MIN_CHARS = 500  # shorter pydoc topics are mostly cross-references, not prose


def build_retention_set(model, tok, *, model_name: str, limit: int = 200, chat: bool = True,
                        max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Score every candidate world fact with the untrained `model`; keep (seeded) at most `limit` of the
    ones it answers correctly (contains match). Returns the JSON-ready set with how it was made."""
    from meft.data import world_facts
    from meft.evaluate import qa_accuracy

    facts = world_facts(RETENTION_RELATIONS, seed=0)
    first = {}  # (subject, relation) -> its first train phrasing: train records come 3 per fact, in order
    for rec in facts.train:
        first.setdefault((rec["subject"], rec["relation"]), rec)
    candidates = list(first.values())
    res = qa_accuracy(model, tok, candidates, batch_size=batch_size, max_new_tokens=max_new_tokens, chat=chat)
    known = [dict(prompt=rec["prompt"], completion=rec["completion"], answers=rec["answers"], subject=rec["subject"],
                  relation=rec["relation"], base_prediction=item["prediction"])
             for rec, item in zip(candidates, res["items"]) if item["contains"]]
    keep = known if len(known) <= limit else random.Random(0).sample(known, limit)
    return {"model": model_name, "chat": chat, "max_new_tokens": max_new_tokens, "criterion": "contains",
            "relations": list(RETENTION_RELATIONS), "candidates": len(candidates),
            "base_known": len(known), "base_exact_match_on_candidates": res["exact_match"],
            "built": time.strftime("%Y-%m-%dT%H:%M"), "questions": keep}


def load_retention(path: str | Path, model_name: str) -> dict:
    """The retention set at `path`; refuses a set built for another model (its questions were chosen
    by that model's answers)."""
    data = json.loads(Path(path).read_text())
    if data["model"] != model_name:
        raise ValueError(f"{path} was built for model {data['model']!r}, this run uses {model_name!r}; "
                         "fix: pass --retention-file of a set built for this model (the CLI builds one)")
    return data


def general_texts(tok, n: int = 64, max_tokens: int = 256) -> list[str]:
    """The first `n` pydoc topics (name order, >= 500 characters), each cut to <= `max_tokens` tokens."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) < _MIN_CHARS:
            continue
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        # a few tokens of room: special tokens perplexity adds, and a re-tokenised cut can differ at its end
        cut = max_tokens - 8
        out.append(text if len(spans) <= cut else text[:spans[cut - 1][1]])
        if len(out) == n:
            break
    return out


def measure(model, tok, *, retention_file: str, model_name: str, retention_limit: int, ppl_texts: int,
            ppl_tokens: int) -> dict:
    """Retention (contains and exact match on the set's first `retention_limit` questions) and
    perplexity on `general_texts`, of `model` as it is now."""
    from meft.evaluate import perplexity, qa_accuracy

    data = load_retention(retention_file, model_name)
    qs = data["questions"][:retention_limit]
    out = {"retention": None}
    if qs:
        res = qa_accuracy(model, tok, qs, batch_size=32, max_new_tokens=data["max_new_tokens"], chat=data["chat"])
        out["retention"] = {"contains": res["contains"], "exact_match": res["exact_match"], "n": res["n"],
                            "set_sha": _sha(json.dumps(qs, sort_keys=True)),
                            "examples": [(i["prompt"], i["prediction"], i["answers"][0]) for i in res["items"][:3]]}
    texts = general_texts(tok, ppl_texts, ppl_tokens)
    ppl = perplexity(model, tok, texts, batch_size=8, max_length=ppl_tokens)
    out["ppl"] = dict(ppl, n_texts=len(texts), texts_sha=_sha("\0".join(texts)))
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
