"""The students' text window (distill.text_truncation): what a MiniLM student sees of a long
review, with the real packaged tokenizer."""

from __future__ import annotations

import pytest

from raydapt.core.assets import load_tokenizer
from raydapt.data.text import truncate_text
from raydapt.train.student import student_texts


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("pkg:all-minilm-l6-v2")


LONG = " ".join(f"w{i}" for i in range(400)) + " in the end it broke after two days"


def test_head_is_the_tokenizers_own_truncation(tok):
    assert student_texts(tok, [LONG, "short"], 32, "head") == [LONG, "short"]


@pytest.mark.parametrize("side", ["tail", "head_tail"])
def test_the_window_keeps_the_ending_and_fits(tok, side):
    short, long_ = student_texts(tok, ["a short review", LONG], 32, side)
    assert short == "a short review"  # within the window: untouched
    enc = tok([long_], truncation=True, max_length=32)["input_ids"][0]
    plain = tok([long_])["input_ids"][0]
    assert enc == plain and len(plain) <= 32  # nothing left for the tokenizer to cut
    assert long_.endswith("broke after two days")
    assert long_.startswith("w0") == (side == "head_tail")
    if side == "head_tail":
        assert " ... " in long_


def test_unknown_side_is_an_error(tok):
    with pytest.raises(ValueError, match="unknown truncation side 'middle'"):
        truncate_text(tok, "x", 4, "middle")
