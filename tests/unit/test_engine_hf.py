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


def test_truncation_sides(engine):
    text = " ".join(f"w{i}" for i in range(200))
    n = engine.count_tokens([text])[0]
    assert n > 40
    head = engine.truncate(text, 40, "head")
    tail = engine.truncate(text, 40, "tail")
    both = engine.truncate(text, 40, "head_tail")
    assert head.startswith("w0 w1") and not head.endswith("w199")
    assert tail.endswith("w199") and "w0 " not in tail
    assert both.startswith("w0 w1") and both.endswith("w199") and " ... " in both
    # each half is cut to 20 tokens; the joint adds at most the " ..." tokens
    assert engine.count_tokens([both])[0] <= 40 + 2
    assert engine.truncate("short text", 40, "head_tail") == "short text"


def test_completion_readout_adds_no_special_tokens():
    """Chat off: SmolLM2's bos_token is '<|im_start|>' (a chat-turn marker), and the tokenizer
    must not put it (or anything) before a plain completion prompt."""
    from raydapt.engines.hf import HFEngine

    eng = HFEngine("pkg:smollm2-135m-instruct", [" negative", " positive"], max_length=64,
                   chat=False, num_threads=2)
    prompt = "Review: great pan\nThe sentiment of this review is"
    ids = eng.tokenize([prompt])["input_ids"][0]
    assert ids == eng.tok(prompt, add_special_tokens=False)["input_ids"]
    assert eng.tok.bos_token_id not in ids and eng.prompt_tokens(prompt) == len(ids)


def test_demonstration_layout_of_a_long_case():
    """Four long demonstrations and a long query at max_length 160: the instruction and the
    whole (truncated) query stay; each demonstration is cut on its own; whole demonstrations are
    dropped farthest first; the nearest sits right before the query."""
    import pandas as pd

    from raydapt.stages.teacher import TeacherScore

    long = " ".join(f"x{i}" for i in range(300))
    demos = {f"d{j}": f"DEMO{j} " + long for j in range(4)}  # d0 nearest ... d3 farthest
    ts = TeacherScore(
        engine={"backend": "hf", "model": "pkg:smollm2-135m-instruct", "max_length": 160,
                "chat": False, "num_threads": 2},
        label_words=[" negative", " positive"],
        template="Review: {text}\nThe sentiment of this review is", text_max_tokens=60,
        text_truncation="head_tail", demo_template="Review: {text}\nSentiment: {label}\n\n",
        demo_max_tokens=30, demo_texts=demos, demo_labels={d: "positive" for d in demos})
    batch = pd.DataFrame({"id": ["q"], "text": ["QUERY " + long + " FINAL"],
                          "demo_ids": [["d0", "d1", "d2", "d3"]]})
    prompt = ts.prompts(batch)[0]
    eng = ts.engine
    n = eng.prompt_tokens(prompt)
    assert n <= 160  # nothing left for the engine's left truncation to cut
    # layout: [d1][d0][query]: each demo ~30 + 7 tokens, query ~60 + 10 -> two demos fit
    assert prompt.index("DEMO1") < prompt.index("DEMO0") < prompt.index("QUERY")
    assert "DEMO2" not in prompt and "DEMO3" not in prompt
    assert prompt.endswith("FINAL\nThe sentiment of this review is")  # query kept whole
    for block in prompt.split("\n\n")[:-1]:  # each demonstration truncated on its own
        assert eng.count_tokens([block])[0] <= 30 + 10
    # and the engine scores exactly this prompt (no left truncation)
    assert int(eng.score([prompt]).prompt_tokens[0]) == n
