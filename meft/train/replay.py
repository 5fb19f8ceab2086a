"""`meft train --replay N`: the untrained model's own answers to questions outside the run, as training records.

The questions and the form of what they teach come from `meft.data.replay`; here the model answers them
(greedy, asked as the run asks: the same system prompt and chat template) before training starts, and the
answers become prompt/completion records marked ``"replay": True``. Training on them is rehearsal with
self-generated targets: the adapter is taught to leave the model's answers alone where it was taught nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meft.data.records import prompt_ids, with_system_prompt
from meft.data.replay import REPLAY_FORMS, REPLAY_MAX_NEW_TOKENS, replay_completion
from meft.evaluate import generate_answers

__all__ = ["self_replay_records"]


def self_replay_records(model, tokenizer, prompts: Sequence[dict], *, system_prompt: str | None = None,
                        batch_size: int = 32, max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
                        chat: bool | None = None, form: str = "sentence") -> list[dict]:
    """The model's greedy answers to `prompts` as prompt/completion records (asked as the run asks:
    `system_prompt`, and `chat` as in `prompt_ids`). `form` "sentence": the first sentence of each answer
    (empty ones dropped); "answer": the first of the prompt's ``answers`` that the model's answer contains
    (`contains_match`), the prompt dropped when it contains none."""
    if form not in REPLAY_FORMS:
        raise ValueError(f"replay form {form!r}: choose one of {', '.join(REPLAY_FORMS)}")
    asked = with_system_prompt([{"prompt": p["prompt"], "completion": "-"} for p in prompts], system_prompt)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, [prompt_ids(r, tokenizer, chat) for r in asked],
                                       batch_size=batch_size, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    out = []
    for p, a in zip(prompts, answers):
        completion = replay_completion(a, p, form)
        if completion:
            out.append({"prompt": p["prompt"], "completion": completion, "subject": p["subject"],
                        "relation": p["relation"], "replay": True})
    return out
