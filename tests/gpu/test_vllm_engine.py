"""vLLM against transformers on real review prompts: same tokens, same label log-probs.

Needs a CUDA GPU and vLLM (``pip install 'raydapt[vllm]'``); skipped otherwise. Both engines run
the packaged SmolLM2-135M-Instruct in the same dtype (``RAYDAPT_VLLM_TEST_DTYPE``, default
float16) on >= 20 Amazon kitchen reviews with SimDA's default zero-shot prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm", reason="vllm is not installed (pip install 'raydapt[vllm]')")

from raydapt.engines.base import renormalise  # noqa: E402
from raydapt.recipes.simda_config import TeacherSection  # noqa: E402
from raydapt.stages.annotate import build_prompt  # noqa: E402

pytestmark = pytest.mark.gpu

MODEL = "pkg:smollm2-135m-instruct"
DTYPE = os.environ.get("RAYDAPT_VLLM_TEST_DTYPE", "float16")
N_PROMPTS = 40
MAX_LENGTH = 256
REPO = Path(__file__).resolve().parents[2]
KITCHEN = Path(os.environ.get("RAYDAPT_DATA", REPO.parent / "shared" / "data")) / "amazon" / (
    "kitchen.jsonl")
if not KITCHEN.exists():
    pytest.skip(f"research data not found at {KITCHEN} (set RAYDAPT_DATA)",
                allow_module_level=True)
T = TeacherSection()
WORDS = [T.verbalizer["negative"], T.verbalizer["positive"]]


@pytest.fixture(scope="module")
def engines():
    # vLLM first, with a small memory share, so both fit on one GPU in one process.
    from raydapt.engines.hf import HFEngine
    from raydapt.engines.vllm import VLLMEngine

    vl = VLLMEngine(MODEL, WORDS, max_length=MAX_LENGTH, dtype=DTYPE, chat=True,
                    answer_prefix=T.answer_prefix,
                    engine_kwargs={"gpu_memory_utilization": 0.3, "enforce_eager": True,
                                   "max_num_seqs": 64})
    hf = HFEngine(MODEL, WORDS, max_length=MAX_LENGTH, dtype=DTYPE, device="cuda", chat=True,
                  answer_prefix=T.answer_prefix)
    return hf, vl


def _review_prompts(hf) -> list[str]:
    """SimDA's zero-shot prompt on N_PROMPTS kitchen reviews, alternating negative / positive."""
    rows = [json.loads(line) for line in KITCHEN.read_text().splitlines()[:400] if line.strip()]
    by_label = {lab: [r for r in rows if r["label"] == lab] for lab in ("negative", "positive")}
    picked = [r for pair in zip(by_label["negative"], by_label["positive"]) for r in pair]
    picked = picked[:N_PROMPTS]
    assert len(picked) >= 20
    return [build_prompt(T.template, hf.truncate(r["text"], T.text_max_tokens)) for r in picked]


@pytest.fixture(scope="module")
def prompts(engines):
    return _review_prompts(engines[0])


def test_vllm_matches_hf_engine(engines, prompts):
    hf, vl = engines
    h = [hf.score(prompts[i:i + 8]) for i in range(0, len(prompts), 8)]
    h_lp = np.concatenate([o.label_logprobs for o in h])
    h_tok = np.concatenate([o.prompt_tokens for o in h])
    v = vl.score(prompts)
    print(f"\nvLLM path: exact_ids_api={vl.exact_ids_api}, second-pass label log-probs: "
          f"{vl.fallback_requests} of {v.label_logprobs.size}")

    assert v.hidden is None
    assert v.label_logprobs.shape == (len(prompts), 2)
    np.testing.assert_array_equal(v.prompt_tokens, h_tok)  # identical token sequences
    # full-vocabulary log-probs (a restricted / renormalised read-out would be far off here)
    assert (v.label_logprobs < 0).all()
    d_logp = np.abs(v.label_logprobs - h_lp)
    assert d_logp.max() <= 0.25, d_logp.max()
    p_h, p_v = renormalise(h_lp), renormalise(v.label_logprobs)
    agree = float((p_h.argmax(1) == p_v.argmax(1)).mean())
    d_p = float(np.abs(p_h - p_v).max())
    print(f"argmax agreement {agree:.3f}, max |d p| {d_p:.4f}, max |d logp| {d_logp.max():.4f}")
    assert agree >= 0.95
    assert d_p <= 0.05


def test_prompt_logprob_pass_is_the_same_quantity(engines, prompts):
    """Pass 2 (prompt + word, prompt_logprobs) reads the same full-vocabulary log-prob."""
    _, vl = engines
    ids = vl.encode(prompts[:8])
    first = vl.score_ids(ids)
    labels = vl.label_token_ids()
    second = np.stack([vl.prompt_logprobs(ids, [t] * len(ids)) for t in labels], axis=1)
    np.testing.assert_allclose(first, second, rtol=0, atol=0.05)


def test_long_prompts_are_cut_on_the_left(engines):
    _, vl = engines
    out = vl.score(["word " * 1000 + "Is this review positive or negative?"])
    assert out.prompt_tokens[0] == MAX_LENGTH
    assert np.isfinite(out.label_logprobs).all()
