"""Tiny NTK-Selector inputs shared by the recipe tests and the cluster rehearsal: a random-init
2-layer Llama with SmolLM2's tokenizer (a local model directory), encoded QA rows, and a random
LoRA adapter saved as a warm-up's would be."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def tiny_model(d: Path) -> Path:
    from raydapt.train.models import random_llama

    return random_llama(d)  # 2 layers, width 32, SmolLM2's tokenizer


def encoded(model: str | Path, n: int, max_length: int = 48) -> pd.DataFrame:
    """``n`` arithmetic QA rows (id, input_ids, response_mask), every other one with a
    rationale, encoded with ``model``'s tokenizer (a path)."""
    from transformers import AutoTokenizer

    from raydapt.data.qa import QAFormat, encode_pair, render

    tok = AutoTokenizer.from_pretrained(model)
    rows = [{"id": f"r{i}", "question": f"What is {i} times {i + 2}?", "options": "{}",
             "context": "", "rationale": f"{i} * {i + 2} = {i * (i + 2)}." if i % 2 else "",
             "answer": str(i * (i + 2))} for i in range(n)]
    encs = [encode_pair(tok, *render(r, QAFormat()), max_length=max_length) for r in rows]
    return pd.DataFrame({"id": [r["id"] for r in rows],
                         "input_ids": [e["input_ids"] for e in encs],
                         "response_mask": [e["response_mask"] for e in encs]})


def random_adapter(model: str | Path, d: Path):
    """A LoRA (r 2 on q / v) with random A and B on ``model``, saved under ``d / "adapter"``
    as the warm-up writes it; returns the peft model (for an in-process reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raydapt.train.lora import load_causal_lm

    base, _ = load_causal_lm(str(model))
    torch.manual_seed(1)
    net = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    net.save_pretrained(d / "adapter")
    return net


def reference_scores(net, rows: pd.DataFrame, proj_dim: int, against):
    """Stage 2's score, in process: per-sample gradients → projection → ⟨against, g⟩."""
    import torch

    from raydapt.data.qa import pad_batch
    from raydapt.select.ntk import RademacherProjector, per_sample_grads, trainable_params

    net.eval()
    b = pad_batch(rows.to_dict("records"), pad_id=0)
    g = per_sample_grads(net, b["input_ids"], b["attention_mask"], b["response_mask"],
                         params=trainable_params(net), method="loop")
    return (RademacherProjector(g.shape[1], proj_dim, seed=0, chunk_rows=256).project(g)
            @ torch.as_tensor(against)).numpy()
