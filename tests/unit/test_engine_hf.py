"""The hf engine on the packaged SmolLM2: left padding, verbalizer checks, chat prompts."""

from __future__ import annotations

import numpy as np
import pytest

from raydapt.engines.base import VerbalizerError, check_single_tokens, renormalise


@pytest.fixture(scope="module")
def engine():
    from raydapt.engines.hf import HFEngine

    return HFEngine("pkg:smollm2-135m-instruct", [" negative", " positive"], max_length=64,
                    chat=True, answer_prefix="The sentiment is", num_threads=2)


def test_batched_left_padding_equals_single_prompts(engine):
    prompts = ["Review: terrible, broke after a day. Positive or negative?",
               "Review: love it"]
    both = engine.score(prompts)
    for i, p in enumerate(prompts):
        one = engine.score([p])
        np.testing.assert_allclose(both.label_logprobs[i], one.label_logprobs[0], atol=2e-4)
        np.testing.assert_allclose(both.hidden[i], one.hidden[0], atol=2e-3, rtol=1e-3)
    assert both.hidden.shape == (2, 576) and both.label_logprobs.shape == (2, 2)
    assert (both.label_logprobs < 0).all()  # log-softmax over the full vocabulary
    assert both.prompt_tokens[0] > both.prompt_tokens[1]


def test_sentiment_direction(engine):
    out = engine.score(["Review: This is the worst blender I ever bought, it broke at once. "
                        "Is the sentiment of this review positive or negative?",
                        "Review: Wonderful knife set, sharp and beautiful, I love it. "
                        "Is the sentiment of this review positive or negative?"])
    p = renormalise(out.label_logprobs)
    assert p[0, 0] > p[1, 0]  # the negative review leans more to " negative"


def test_truncation_keeps_the_end_of_prompts(engine):
    long = "word " * 500 + "Answer now."
    out = engine.score([long])
    assert out.prompt_tokens[0] == 64
    assert engine.truncate("one two three four", 2) == "one two"


def test_multi_token_verbalizer_is_rejected():
    with pytest.raises(VerbalizerError, match="single token"):
        check_single_tokens({" positive": [1], " very positive": [2, 3]}, "m")
    with pytest.raises(VerbalizerError, match="share a token"):
        check_single_tokens({"a": [5], "b": [5]}, "m")
    from raydapt.engines.hf import HFEngine

    with pytest.raises(VerbalizerError, match="extraordinarily"):
        HFEngine("pkg:smollm2-135m-instruct", [" negative", " extraordinarilyfabulous"])
