"""NTK-Selector pieces without Ray: QA reading/formatting, response masks, selectors, kNN votes,
multiple-choice letter scoring, the DeepSpeed config and the job config."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from raydapt.data.qa import QAFormat, encode_pair, normalise_qa, pad_batch, read_qa, render
from raydapt.select.selectors import SELECTORS, SelectionInputs, knn_votes


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from raydapt.core.assets import resolve_model

    t = AutoTokenizer.from_pretrained(resolve_model("pkg:smollm2-135m-instruct").path)
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


def test_read_qa_rejects_malformed_rows(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [
        {"id": "a", "question": "Q1?", "options": {"A": "x", "B": "y"}, "answer": "B"},
        {"id": "b", "question": "Q2?", "options": {"A": "x"}, "answer": "C"},
        {"id": "c", "question": "  ", "answer": "A"},
        {"question": "no id", "answer": "A"},
        {"id": "d", "question": "Q4?", "options": 5, "answer": "A"},
        {"id": "e", "question": "Q5?", "answer": ""},
        {"id": "a", "question": "dup", "answer": "1"},
        {"id": "f", "question": "Q6?", "options": ["p", "q"], "answer": "B", "rationale": "r"},
    ]
    rows.append({"id": "g", "question": "Line\u2028separator?", "answer": "ok\u0085"})
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
                 + "\n{not json\n", encoding="utf-8")
    good, rej = read_qa(p)
    assert list(good["id"]) == ["a", "f", "g"]  # U+2028 inside a string is not a line break
    assert json.loads(good.set_index("id").loc["f", "options"]) == {"A": "p", "B": "q"}
    reasons = dict(zip(rej["id"].fillna("?"), rej["reason"]))
    assert "not one of the options" in reasons["b"]
    assert reasons["c"] == "empty question" and reasons["e"] == "empty answer"
    assert "mapping or a list" in reasons["d"] and reasons["a"] == "duplicate id"
    assert any("missing id" in r for r in rej["reason"])
    assert any("invalid JSON" in r for r in rej["reason"])
    bad = tmp_path / "cols.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": "t"}) + "\n")
    with pytest.raises(Exception, match=r"missing column\(s\) \['answer', 'question'\]"):
        read_qa(bad)


def test_render_and_response_mask(tok):
    row = normalise_qa([{"id": "1", "question": "Is it?", "context": "Ctx.",
                         "options": {"A": "yes", "B": "no"}, "answer": "B",
                         "rationale": "Because."}], file="f")[0].iloc[0]
    prompt, response = render(row, QAFormat())
    assert prompt == "Ctx.\n\nIs it?\nA. yes\nB. no"
    assert response == "Because.\nThe answer is B."
    e = encode_pair(tok, prompt, response, max_length=128)
    ids, rm = e["input_ids"], e["response_mask"]
    n_resp = sum(rm)
    # the masked tokens are exactly the response (+ EOS), at the end, after the chat prefix
    assert rm == [0] * (len(ids) - n_resp) + [1] * n_resp
    assert tok.decode(ids[-n_resp:]) == response + tok.eos_token
    assert "<|im_start|>assistant\n" in tok.decode(ids[: len(ids) - n_resp])
    # too long: the prompt loses its left end, the response keeps >= 8 tokens
    e2 = encode_pair(tok, "word " * 200 + prompt, response * 20, max_length=40)
    assert len(e2["input_ids"]) == 40 and sum(e2["response_mask"]) >= 8
    b = pad_batch([e, e2], pad_id=0)
    assert b["input_ids"].shape == (2, len(ids)) and int(b["attention_mask"][1].sum()) == 40


def test_selectors_interface():
    ids = np.array([f"c{i}" for i in range(10)])
    inputs = SelectionInputs(
        pool_ids=ids, votes=np.array([0, 3, 1, 3, 0, 0, 2, 0, 0, 1]),
        vote_sim=np.array([0, 2.0, 0.5, 2.5, 0, 0, 1.5, 0, 0, 0.9]),
        scores={"ntk": pd.Series([0.1, 0.9, -1.0], index=["c2", "c5", "c7"]),
                "less": pd.Series([0.3, np.nan, 0.2], index=["c1", "c3", "c4"])})
    r1 = SELECTORS["random"](seed=1).select(inputs, 4)
    assert r1.equals(SELECTORS["random"](seed=1).select(inputs, 4))  # seeded
    assert not r1["id"].equals(SELECTORS["random"](seed=2).select(inputs, 4)["id"])
    assert len(set(r1["id"])) == 4 and list(r1["rank"]) == [0, 1, 2, 3]
    # random order does not depend on the pool's row order
    shuffled = SelectionInputs(pool_ids=ids[::-1].copy())
    assert set(SELECTORS["random"](seed=1).select(shuffled, 4)["id"]) == set(r1["id"])
    emb = SELECTORS["embedding"]().select(inputs, 3)
    assert list(emb["id"]) == ["c3", "c1", "c6"]  # 3 votes (tie → higher sim), then 2
    assert list(SELECTORS["ntk"]().select(inputs, 2)["id"]) == ["c5", "c2"]
    assert list(SELECTORS["less"]().select(inputs, 5)["id"]) == ["c1", "c4"]  # NaN dropped
    with pytest.raises(ValueError, match="stage-1 votes"):
        SELECTORS["embedding"]().select(SelectionInputs(pool_ids=ids), 2)


def test_knn_votes_pick_the_obvious_nearest():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(20, 16)).astype(np.float32)
    # three domain samples that are (scaled, slightly noisy) copies of pool rows 4, 4 and 11
    dom = np.stack([3 * pool[4], 0.5 * pool[4] + 0.01 * rng.normal(size=16), pool[11]])
    votes, sim = knn_votes(dom, pool, k=1)
    assert votes[4] == 2 and votes[11] == 1 and votes.sum() == 3
    assert sim[4] == pytest.approx(2.0, abs=1e-3)  # two cosines of ~1
    sel = SELECTORS["embedding"]().select(SelectionInputs(
        pool_ids=np.arange(20).astype(str), votes=votes, vote_sim=sim), 2)
    assert list(sel["id"]) == ["4", "11"]
    v5, _ = knn_votes(dom, pool, k=5)
    assert v5.sum() == 15 and v5[4] == 2


class _LetterLM(torch.nn.Module):
    """Stand-in LM whose next-token logits favour a chosen token per prompt (by batch row)."""

    def __init__(self, vocab: int, favour: list[int]) -> None:
        super().__init__()
        self.vocab, self.favour = vocab, favour

    def forward(self, input_ids, attention_mask=None, logits_to_keep=1):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for i, t in enumerate(self.favour):
            logits[i, 0, t] = 5.0
        assert attention_mask[:, -1].all()  # left padding: the last position is real

        class Out:
            pass

        o = Out()
        o.logits = logits
        return o


def test_mc_letter_scoring_hand_built(tok):
    from raydapt.stages.grad_score import letter_logprobs

    letter_ids = [tok(f" {x}", add_special_tokens=False)["input_ids"][0] for x in "ABCD"]
    net = _LetterLM(len(tok), favour=[letter_ids[2], letter_ids[0]])
    lp = letter_logprobs(net, tok, ["short prompt", "a much longer prompt " * 5], letter_ids,
                         device="cpu", max_length=64)
    assert lp.shape == (2, 4)
    assert lp[0].argmax() == 2 and lp[1].argmax() == 0
    # hand value: one logit 5 among V zeros -> log p = 5 - log(e^5 + V - 1)
    V = len(tok)
    assert lp[0, 2] == pytest.approx(5 - np.log(np.exp(5) + V - 1), abs=1e-5)
    assert lp[0, 0] == pytest.approx(-np.log(np.exp(5) + V - 1), abs=1e-5)


def test_deepspeed_config_and_job_config():
    from raydapt.config import ConfigError, validate_job
    from raydapt.recipes.ntk_select_config import NTKSelectJob
    from raydapt.train.lora import deepspeed_config

    c = deepspeed_config(micro_batch=4, grad_accum=2, world=2, lr=1e-4, weight_decay=0.0,
                         total_steps=10, warmup_steps=0, zero_stage=2, dtype="float32", cpu=True)
    assert c["train_batch_size"] == 16 and c["optimizer"]["params"]["torch_adam"] is True
    assert c["zero_optimization"] == {"stage": 2}
    assert c["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed refuses 0
    g = deepspeed_config(micro_batch=1, grad_accum=1, world=8, lr=1e-4, weight_decay=0.0,
                         total_steps=10, warmup_steps=1, zero_stage=3, dtype="bfloat16", cpu=False)
    assert g["bf16"] == {"enabled": True} and "torch_adam" not in g["optimizer"]["params"]
    with pytest.raises(ValueError, match="fp16"):
        deepspeed_config(micro_batch=1, grad_accum=1, world=1, lr=1e-4, weight_decay=0.0,
                         total_steps=1, warmup_steps=0, zero_stage=2, dtype="float16", cpu=True)
    job = validate_job({"method": "ntk_select", "select": {"selectors": ["ntk", "less"]}})
    assert isinstance(job, NTKSelectJob) and job.select.n_factor == 9.0
    with pytest.raises(ConfigError, match="select.selectors"):
        validate_job({"method": "ntk_select", "select": {"selectors": ["dsir"]}})


def test_majority_letter_accuracy_by_hand():
    from raydapt.evaluate import majority_letter_accuracy

    domain = pd.DataFrame({"task": ["a", "a", "a", "b", "b"],
                           "answer": ["C", "C", "A", "B", "A"]})  # a → C; b: tie A/B → A
    tests = {"a": pd.DataFrame({"answer": ["C", "B", "C", "D"]}),  # 2/4
             "b": pd.DataFrame({"answer": ["A", "B", "B"]}),  # 1/3
             "c": pd.DataFrame({"answer": ["A", "A", "C"]})}  # not in D: all of D, A/C tie → A
    acc = majority_letter_accuracy(domain, tests)
    assert acc["a"] == 0.5 and acc["b"] == pytest.approx(1 / 3) and acc["c"] == pytest.approx(2 / 3)
    assert acc["mean"] == pytest.approx((0.5 + 1 / 3 + 2 / 3) / 3)
    # no domain answers at all (every task with domain_rows 0): no floor, not a crash
    none = majority_letter_accuracy(domain.iloc[:0], tests)
    assert all(np.isnan(v) for v in none.values())


def test_calibrated_mc_metrics_by_hand():
    """Both items prefer option 0 (raw accuracy 1/2); after removing the mean option log-prob
    (batch calibration) item 2 picks its gold option 1. A failed item counts as wrong."""
    from raydapt.evaluate import calibrated_mc_metrics

    m = pd.DataFrame({"task": ["t", "t", "t"], "gold": [0, 1, 0],
                      "letter_logp": [list(np.log([0.6, 0.2])), list(np.log([0.5, 0.3])), None]})
    out = calibrated_mc_metrics(m)
    assert out["calibrated"] == {"t": pytest.approx(2 / 3), "mean": pytest.approx(2 / 3)}
    # options renormalised: item 1 → [0.75, 0.25], item 2 → [0.625, 0.375]; gold 0.75, 0.375
    assert out["gold_logprob"]["t"] == pytest.approx((np.log(0.75) + np.log(0.375)) / 2)


def _pool_shards(tmp_path, rng):
    """A streamed stage-1 output by hand: 3 shards with embeddings, a reject, an encode
    failure, an embed failure and an id that occurs twice (its second row differs)."""
    from raydapt.core.cache import ShardedOutput

    out = ShardedOutput(tmp_path / "embed", 0, 1, n_shards=3)
    out.d.mkdir()
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    rows = [{"id": f"c{i}", "emb": emb[i].tolist(), "input_ids": [1, 2, i],
             "response_mask": [0, 1, 1], "source": "s", "_reject": "", "_error": ""}
            for i in range(60)]
    rows[7] = {**rows[7], "emb": None, "_error": "encode: does not fit"}
    rows[9] = {**rows[9], "emb": [float("nan")] * 8, "_error": "embed: boom"}
    rows[30] = {**rows[30], "id": "c3", "emb": (emb[30] + 5).tolist()}  # c3 again
    rows.insert(12, {"id": "", "emb": None, "input_ids": None, "response_mask": None,
                     "source": "", "_reject": json.dumps({"file": "f", "id": None,
                                                          "reason": "empty question",
                                                          "raw": ""}), "_error": ""})
    import pyarrow as pa

    for i, part in enumerate((rows[:20], rows[20:41], rows[41:])):
        out.write_table(i, pa.Table.from_pylist(part))
    return out, emb


def test_streamed_pool_index_votes_and_rows(tmp_path):
    """The recipe's reading of a streamed stage-1 output: the index (first rows, duplicate and
    encode rejects, embed failures kept without embedding), votes over the shards equal FAISS
    flat votes over the good first rows (also with an exhaustive IVF), tokens read back by id
    (embed failures too, duplicates at their first row)."""
    from raydapt.recipes.ntk_select import index_pool, rows_by_id, stage1_votes
    from raydapt.recipes.ntk_select_config import NTKSelectJob

    rng = np.random.default_rng(0)
    out, emb = _pool_shards(tmp_path, rng)
    idx = index_pool(out)
    want_ids = [f"c{i}" for i in range(60) if i not in (7, 30)]
    assert list(idx.ids) == want_ids and idx.dups == {"c3"}
    assert list(idx.embedded) == [i != "c9" for i in want_ids]
    assert sorted(idx.rejects["reason"]) == [
        "does not fit", "duplicate id in the pool (its first row in file "
        "order is kept)", "embed: boom", "empty question"]
    dom = rng.normal(size=(5, 8)).astype(np.float32)
    good = [i for i in range(60) if i not in (7, 9, 30)]
    v_ref, s_ref = knn_votes(dom, emb[good], k=6)
    cfg = NTKSelectJob(select={"k": 6})
    for index in ("flat", "ivf"):
        c = cfg.model_copy(update={"select": cfg.select.model_copy(update={
            "index": index, "index_nlist": 1, "index_train_rows": 10})})
        got = stage1_votes(c, out, dom, dups=idx.dups).set_index("id")
        full = got.reindex([f"c{i}" for i in good]).fillna(0)
        np.testing.assert_array_equal(full["votes"].to_numpy(), v_ref)
        np.testing.assert_allclose(full["vote_sim"].to_numpy(), s_ref, rtol=1e-5, atol=1e-5)
    got = rows_by_id(out, ["c9", "c3", "c0"], ["input_ids", "source"], dups=idx.dups)
    assert list(got["id"]) == ["c9", "c3", "c0"]
    assert got["input_ids"].tolist() == [[1, 2, 9], [1, 2, 3], [1, 2, 0]]  # c3: its first row
    with pytest.raises(RuntimeError, match="missing"):
        rows_by_id(out, ["c7"], ["input_ids"], dups=idx.dups)  # not encoded: not a pool row


def test_cpu_fits_skip_deepspeeds_shared_memory_all_reduce_build(tmp_path):
    """DeepSpeed's CPU backend JIT-compiles ``deepspeed_shm_comm`` (g++, 50 s to 2.5 min on a
    fresh 2-core machine) when it starts, for inference_all_reduce only. After
    ``skip_shm_comm_build`` the backend's builder returns None and nothing is compiled (a fresh
    extensions directory stays empty); without it the op is compatible here, so the check can
    fail."""
    import subprocess
    import sys

    code = ("import os\n"
            "from raydapt.train.lora import skip_shm_comm_build\n"
            "import deepspeed.ops\n"
            "before = deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']\n"
            "skip_shm_comm_build()\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "print(before, build_shm_op() is None)\n")
    ext = tmp_path / "ext"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["True", "True"], r.stdout + r.stderr[-2000:]
    assert not ext.exists() or not any(ext.rglob("*.so"))
