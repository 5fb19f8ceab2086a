"""meft.data.background: the background text of the sparse update's idf, from prose or from questions."""

import pytest

from meft.config import MeftConfig
from meft.data.background import background_questions, background_token_ids
from meft.data.retention import FREE_SUBJECTS, RETENTION_QUESTIONS
from tests.meft.data.test_records import tiny_tokenizer


def test_questions_leave_out_the_probe_and_come_in_seeded_order():
    qs = background_questions()
    assert len(qs) > 500 and len(set(qs)) == len(qs)
    probe = {subject for *_, subject in RETENTION_QUESTIONS} | set(FREE_SUBJECTS)
    assert not [q for q in qs for s in probe if f" {s}?" in q]  # no question about a probed country
    assert background_questions(seed=0) == qs and background_questions(seed=1) != qs


def test_question_rows_are_chat_prompts_of_exactly_n_tokens():
    tok = tiny_tokenizer()
    rows = background_token_ids(tok, 500, source="questions")
    assert sum(r.shape[1] for r in rows) == 500 and all(r.shape[0] == 1 for r in rows)
    first = tok.decode(rows[0][0])
    assert background_questions()[0] in first and first.rstrip().endswith("assistant")  # generation prompt
    assert "<|im_start|>system" in first  # an empty system turn, as the built-in sets train


def test_pydoc_rows_and_errors():
    tok = tiny_tokenizer()
    rows = background_token_ids(tok, 600)
    assert [r.shape[1] for r in rows] == [256, 256, 88]
    with pytest.raises(ValueError, match="background source 'web': choose one of pydoc, questions"):
        background_token_ids(tok, 10, source="web")
    with pytest.raises(ValueError, match="fewer than"):
        background_token_ids(tok, 10**8, source="questions")
    with pytest.raises(ValueError, match=r"sparse_background = 'web': one of 'pydoc', 'questions'"):
        MeftConfig(sparse_background="web").validate()
