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


def test_a_student_trains_and_evaluates_on_head_tail_windows(ray_local, tmp_path):
    import numpy as np
    import pandas as pd

    from raydapt.train.student import StudentTrain, fit_student

    # long texts whose label is only in their last words: the window must keep the ending
    df = pd.DataFrame({"text": [LONG.replace("broke after two days", w) for w in
                                ["great", "awful"] * 4], "y": [0, 1] * 4})
    m = fit_student(name="tiny-ht", objective="supervised", eval_df=df, num_classes=2,
                    student="pkg:all-minilm-l6-v2", seed=0, storage=str(tmp_path),
                    train_ds=ray_local.data.from_pandas(df),
                    train=StudentTrain(num_workers=1, batch_size=4, epochs=2, lr=1e-3,
                                       weight_decay=0.0, warmup_ratio=0.0, max_length=16,
                                       text_truncation="head_tail"))
    assert m["steps"] == 4 and np.asarray(m["confusion"]).sum() == 8
    # disk: one state per epoch was written, only Ray Train's retained copy is left (a
    # MiniLM student's state is 270 MB; every epoch's scratch copy used to stay behind)
    states = sorted(p.relative_to(tmp_path).parts[1] for p in tmp_path.rglob("state.pt"))
    assert len(states) == 1 and states[0].startswith("checkpoint_"), states
