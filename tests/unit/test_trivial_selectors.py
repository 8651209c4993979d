"""The model-free selectors of raydapt/select/selectors.py (format, length, tfidf): hand-built
pools where the right picks are known, their features against hand counts, and a clear error
without the text they read. No Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest

from raydapt.select.selectors import (
    SELECTORS,
    TRIVIAL,
    SelectionInputs,
    layout_features,
    length_features,
)

D = [("Which organ? \nA. heart\nB. lung\nC. liver", "The answer is B."),
     ("Which vessel? \nA. aorta\nB. vein\nC. artery", "The answer is A.")]
POOL = [
    ("q1", "What is 3 + 4?", "3 + 4 = 7\nThe answer is 7."),
    ("q2", "Which gland? \nA. thyroid\nB. pituitary\nC. adrenal", "The answer is C."),
    ("q3", "Is the sky blue on a clear day at noon?", "Light scatters.\nThe answer is yes."),
    ("q4", "Which organ pumps blood? \nA. heart\nB. lung\nC. liver", "The answer is A."),
]


def _inputs():
    return SelectionInputs(pool_ids=np.array([p[0] for p in POOL]),
                           pool_text=[p[1:] for p in POOL], domain_text=D)


def test_layout_and_length_features_hand_counted():
    f = layout_features([POOL[0][1:], POOL[1][1:], ("Q\nOptions:\n(A) x\n(B) y", "R\nThe answer is (B).")])
    # option lines, single-letter answer, answer only, '=' in the response, digit share of prompt
    assert f[0].tolist() == [0, 0, 0, 1, pytest.approx(2 / 14)]
    assert f[1].tolist() == [3, 1, 1, 0, 0]
    assert f[2].tolist() == [2, 1, 0, 0, 0]
    assert length_features([("a b c", "d")]).tolist() == [[np.log(4), np.log(2)]]


def test_trivial_selectors_pick_what_they_should():
    x = _inputs()
    # format: the two multiple-choice rows with a bare letter answer, like D's
    assert set(SELECTORS["format"]().select(x, 2)["id"]) == {"q2", "q4"}
    # tfidf: q4 shares D's words (organ, heart, lung, liver), q2 only the layout words
    t = SELECTORS["tfidf"]().select(x, 4)
    assert t["id"].tolist()[0] == "q4" and t["score"].is_monotonic_decreasing
    sc = SELECTORS["tfidf"]().pool_scores(x)
    assert sc[3] > sc[1] > 0 and np.all(sc <= 1 + 1e-9)
    # length: D's prompts have 9 words and 4-word responses; q1 and q3 are farthest
    ln = SELECTORS["length"]().select(x, 4)["id"].tolist()
    assert set(ln[:2]) == {"q2", "q4"}
    for name in TRIVIAL:  # rank 0..n-1, ids from the pool, deterministic
        a, b = SELECTORS[name](seed=0).select(x, 3), SELECTORS[name](seed=5).select(x, 3)
        assert a.equals(b) and a["rank"].tolist() == [0, 1, 2]


def test_trivial_selectors_need_text():
    with pytest.raises(ValueError, match="pool_text and domain_text"):
        SELECTORS["tfidf"]().select(SelectionInputs(pool_ids=np.array(["a"])), 1)
    bad = SelectionInputs(pool_ids=np.array(["a", "b"]), pool_text=[("x", "y")], domain_text=D)
    with pytest.raises(ValueError, match="align"):
        SELECTORS["format"]().select(bad, 1)
