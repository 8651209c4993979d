"""Held-out gold-response NLL (NTK-Selector evaluation) against a hand computation on a tiny
random model; the per-task summary is token-weighted."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from raydapt.data.qa import pad_batch
from raydapt.recipes.ntk_select import nll_summary
from raydapt.stages.grad_score import response_nll


def test_response_nll_matches_hand_computation():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2)
    net = transformers.LlamaForCausalLM(cfg).eval()
    encs = [{"input_ids": [3, 7, 9, 11, 2, 5], "response_mask": [0, 0, 0, 1, 1, 1]},
            {"input_ids": [4, 8, 1], "response_mask": [0, 1, 1]}]
    b = pad_batch(encs, pad_id=0)
    s, n = response_nll(net, b["input_ids"], b["attention_mask"], b["response_mask"])
    for i, e in enumerate(encs):  # by hand: each sequence alone, position by position
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logits = net(input_ids=ids).logits[0]
        want = 0.0
        for t in range(1, len(e["input_ids"])):
            if e["response_mask"][t]:
                want -= float(torch.log_softmax(logits[t - 1].double(), -1)[e["input_ids"][t]])
        assert s[i] == pytest.approx(want, rel=1e-5)
        assert n[i] == sum(e["response_mask"][1:])


def test_nll_summary_is_token_weighted_per_task():
    m = pd.DataFrame({"id": list("abcd"), "task": ["x", "x", "y", "y"],
                      "nll_sum": [6.0, 2.0, 3.0, float("nan")],
                      "n_tokens": [3, 1, 2, float("nan")]})
    r = nll_summary(m)
    assert r["x"] == pytest.approx(8 / 4) and r["y"] == pytest.approx(1.5)
    assert r["mean"] == pytest.approx(1.75) and r["failed"] == 1.0
    assert math.isnan(nll_summary(m.iloc[3:])["mean"])
