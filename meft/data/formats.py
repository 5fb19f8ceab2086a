"""Record formats: detect which one a record is in, check it, and turn it into a canonical record.

Owns the formats people already have (one record = one JSON object / parquet row) and their rules:

=================  ====================================================  ==================================
format             keys                                                  canonical record
=================  ====================================================  ==================================
prompt_completion  ``prompt``, ``completion``                            itself (QA; loss on the completion)
messages           ``messages``: ``[{"role", "content"}, ...]`` (OpenAI)  itself (chat; loss on assistant turns)
sharegpt           ``conversations``: ``[{"from", "value"}, ...]``        ``messages`` (human->user, gpt->assistant)
                   (+ optional ``system``)
alpaca             ``instruction``, optional ``input``, ``output``       ``prompt`` = instruction [+ blank line
                   (+ optional ``system``)                                + input], ``completion`` = output
text               ``text``                                              itself (packed; loss on every token)
=================  ====================================================  ==================================

A record's format is decided by which of ``prompt`` / ``messages`` / ``conversations`` / ``instruction``
/ ``text`` it has (an Alpaca record may also carry a pre-rendered ``text``, as tatsu-lab/alpaca does;
that one is ignored). OpenAI ``content`` may also be a list of ``{"type": "text", "text"}`` parts.
Optional ``"answers": [str, ...]`` lists the accepted answers for evaluation; other keys are kept and
ignored. Every problem is reported in the record's own terms (``conversations[2].from is 'bot'``).
Reading files (``.jsonl`` / ``.json`` / ``.parquet``) and the one-format-per-file rule are in
`meft.data.files`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DataError", "FORMATS", "detect_format", "to_canonical", "validate_record", "records_kind"]

_ROLES = ("system", "user", "assistant")
_MAX_SHOWN = 50
# format -> the key that identifies it (checked in this order; see the module docstring)
FORMATS = {"prompt_completion": "prompt", "messages": "messages", "sharegpt": "conversations",
           "alpaca": "instruction", "text": "text"}
_FORMAT_KEYS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                "sharegpt": ("conversations", "system"), "alpaca": ("instruction", "input", "output", "system", "text"),
                "text": ("text",)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """Malformed training data. `errors` holds one ``"file:line: reason"`` string per problem."""
    def __init__(self, errors: Sequence[str], what: str = "data"):
        self.errors = list(errors)
        shown = "\n  ".join(self.errors[:_MAX_SHOWN])
        more = f"\n  ... and {len(self.errors) - _MAX_SHOWN} more" if len(self.errors) > _MAX_SHOWN else ""
        super().__init__(
            f"{len(self.errors)} problem(s) in {what}; nothing was skipped, fix them and rerun:"
            f"\n  {shown}{more}"
        )


def detect_format(rec) -> tuple[str | None, str | None]:
    """``(format, None)`` with format one of `FORMATS`, or ``(None, reason)``."""
    if not isinstance(rec, dict):
        return None, f"expected a JSON object, got {type(rec).__name__}"
    present = [f for f, key in FORMATS.items() if key in rec]
    if "alpaca" in present and "text" in present:  # tatsu-lab/alpaca: 'text' is the rendered prompt
        present.remove("text")
    if len(present) == 1:
        return present[0], None
    keys = "', '".join(f"{FORMATS[f]}" for f in present)
    what = "none of" if not present else f"several of ('{keys}' ->"
    what += "" if not present else f" {', '.join(present)})"
    return None, (f"record has {what} the keys 'prompt'+'completion', 'messages', 'conversations', "
                  f"'instruction'+'output', 'text' (keys: {sorted(rec)[:8]}); use exactly one format per record")


# ----------------------------------------------------------------------------- canonical records

def _check_message(i: int, msg) -> str | None:
    if not isinstance(msg, dict):
        return f"messages[{i}] is {type(msg).__name__}, expected an object with 'role' and 'content'"
    if msg.get("role") not in _ROLES:
        return f"messages[{i}].role is {msg.get('role')!r}, expected one of {list(_ROLES)}"
    if not isinstance(msg.get("content"), str):
        return f"messages[{i}].content is {type(msg.get('content')).__name__}, expected a string"
    return None


def _check_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role', 'content'} objects"
    for i, msg in enumerate(messages):
        problem = _check_message(i, msg)
        if problem:
            return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no assistant message, so there is nothing to learn"
    return None


def validate_record(rec) -> tuple[str | None, str | None]:
    """A canonical record -> ``(kind, None)`` with kind in {"qa", "chat", "text"}, or ``(None, reason)``."""
    fmt, reason = detect_format(rec)
    if reason:
        return None, reason
    if fmt not in ("prompt_completion", "messages", "text"):
        return None, f"a {fmt} record is not canonical; convert it with to_canonical first"
    kind = {"prompt_completion": "qa", "messages": "chat", "text": "text"}[fmt]
    if kind == "qa":
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                return None, f"'{key}' is {type(rec.get(key)).__name__}, expected a string"
        if not rec["completion"].strip():
            return None, "'completion' is empty, so there is nothing to learn"
    elif kind == "chat":
        problem = _check_messages(rec["messages"])
        if problem:
            return None, problem
    elif not isinstance(rec["text"], str) or not rec["text"].strip():
        return None, "'text' must be a non-empty string"
    answers = rec.get("answers")
    if answers is not None and (not isinstance(answers, list) or not answers
                                or not all(isinstance(a, str) for a in answers)):
        return None, "'answers' must be a non-empty list of strings"
    return kind, None


def records_kind(records: Sequence[dict]) -> str:
    """"text" if every record is a text record, "qa" if every record is prompt/completion or chat."""
    kinds = {"text" if "text" in r and "prompt" not in r and "messages" not in r else "qa" for r in records}
    if len(kinds) != 1:
        raise DataError([f"records mix {sorted(kinds)}; use one kind per dataset"])
    return kinds.pop()


# ----------------------------------------------------------------------------- conversions

def _openai_content(content):
    """OpenAI content: a string, or a list of {"type": "text", "text"} parts (joined)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content


def _from_messages(rec: dict) -> tuple[dict | None, str | None]:
    msgs = rec["messages"]
    if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
        msgs = [{**m, "content": _openai_content(m.get("content"))} for m in msgs]
    return {"messages": msgs}, None


def _from_sharegpt(rec: dict) -> tuple[dict | None, str | None]:
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv:
        return None, "'conversations' must be a non-empty list of {'from', 'value'} objects"
    msgs = []
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            return None, f"'system' is {type(system).__name__}, expected a string"
        if system.strip():
            msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return None, f"conversations[{i}] is {type(turn).__name__}, expected an object with 'from' and 'value'"
        if turn.get("from") not in SHAREGPT_ROLES:
            return None, (f"conversations[{i}].from is {turn.get('from')!r}, expected one of "
                          f"{sorted(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            return None, f"conversations[{i}].value is {type(turn.get('value')).__name__}, expected a string"
        msgs.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in msgs):
        return None, "'conversations' has no 'gpt' / 'assistant' turn, so there is nothing to learn"
    return {"messages": msgs}, None


def _from_alpaca(rec: dict) -> tuple[dict | None, str | None]:
    for key, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        value = rec.get(key)
        if (required or value is not None) and not isinstance(value, str):
            return None, f"Alpaca '{key}' is {type(value).__name__}, expected a string"
    if not rec["output"].strip():
        return None, "Alpaca 'output' is empty, so there is nothing to learn"
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if (rec.get("input") or "").strip() else "")
    if (rec.get("system") or "").strip():
        return {"messages": [{"role": "system", "content": rec["system"]}, {"role": "user", "content": prompt},
                             {"role": "assistant", "content": rec["output"]}]}, None
    return {"prompt": prompt, "completion": rec["output"]}, None


_CONVERT = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}


def to_canonical(rec, fmt: str | None = None) -> tuple[dict | None, str | None, str | None]:
    """Any supported record -> ``(canonical record, kind, None)`` or ``(None, None, reason)``.

    The canonical record keeps ``answers`` and every key that belongs to no format; `fmt` skips detection.
    """
    if fmt is None:
        fmt, reason = detect_format(rec)
        if reason:
            return None, None, reason
    if fmt in _CONVERT:
        core, reason = _CONVERT[fmt](rec)
        if reason:
            return None, None, reason
        out = {k: v for k, v in rec.items() if k not in _FORMAT_KEYS[fmt]} | core
    else:
        out = dict(rec)
    kind, reason = validate_record(out)
    if reason:
        return None, None, reason
    return out, kind, None
