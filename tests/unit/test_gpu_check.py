"""The GPU check script (benchmarks/gpu_check.py) on CPU, with the packages the GPU machine lacks
made unimportable, and the library hooks it relies on (device and dtype respected)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# Run the script with ray & co. hidden from every import finder (as on the bare GPU machine,
# where they are not installed): importlib.util.find_spec says "absent", import raises.
BLOCKED_RUN = """
import runpy, sys
BLOCKED = {"ray", "pydantic", "mlflow", "faiss", "deepspeed", "vllm", "gguf"}
class Hide:
    def __init__(self, inner): self.inner = inner
    def __getattr__(self, k): return getattr(self.inner, k)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        f = getattr(self.inner, "find_spec", None)
        return f(name, path, target) if f else None
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def _run_blocked(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _numbers(x):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


def test_quick_check_runs_every_section_without_ray_or_deepspeed(tmp_path):
    res = _run_blocked(tmp_path, "--quick", "--device", "cpu", "--threads", "2")
    secs = res["sections"]
    expected = {"meta", "peak", "correctness_grads", "correctness_engine", "teacher", "ntk",
                "lora_step", "dallmi"}
    assert expected <= set(secs)
    for name in expected:
        assert secs[name]["status"] == "ok", (name, secs[name].get("error"),
                                              secs[name].get("traceback"))
    assert all(math.isfinite(v) for v in _numbers(secs)), "a non-finite figure"
    assert res["all_sections_ok"] is True
    assert res["correctness"] == {"per_sample_grads": True, "engine_vs_cpu": True,
                                  "ntk_big_model": True, "dallmi_batched_equals_loop": True}
    assert secs["peak"]["bf16_matmul_tflops"] > 0
    for m in ("hooks", "vmap", "loop"):
        assert secs["ntk"]["methods"][m]["samples_per_s"] > 0
        assert secs["ntk"]["methods"][m]["frac_of_peak"] > 0
    assert secs["ntk"]["hooks_over_loop"] > 0
    assert secs["teacher"]["rows_per_s"] > 0 and secs["teacher"]["tokens_per_s"] > 0
    assert secs["lora_step"]["tokens_per_s"] > 0
    assert all(math.isfinite(x) for x in secs["lora_step"]["losses"])
    assert secs["dallmi"]["loop_over_batched"] > 0
    assert res["sizes"]["llama"]["hidden"] == 64  # the quick preset ran
    assert "ray" not in res["sections"]["meta"]["machine"]  # ray was hidden


@pytest.mark.gpu
def test_correctness_on_cuda(tmp_path):
    res = _run_blocked(tmp_path, "--quick", "--device", "cuda",
                       "--sections", "correctness_grads,correctness_engine")
    assert res["correctness"]["per_sample_grads"] is True, res["sections"]["correctness_grads"]
    assert res["correctness"]["engine_vs_cpu"] is True, res["sections"]["correctness_engine"]
    assert res["sections"]["correctness_grads"]["float32"]["grad_device"].startswith("cuda")


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(dtype)


def test_add_lora_and_sft_loss_respect_the_model_dtype():
    from raydapt.select.ntk import response_loss_objective
    from raydapt.train.lora import add_lora, sft_loss

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "response_mask": (torch.arange(10) >= 4).long().expand(3, 10)}
    losses = {}
    for dt in (torch.float32, torch.bfloat16):
        m = add_lora(_tiny_llama(dt), lora, seed=0)
        assert m.get_base_model().lm_head.weight.dtype == dt  # the base keeps its dtype
        assert any("lora_A" in n for n, p in m.named_parameters() if p.requires_grad)
        loss = sft_loss(m, batch)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        losses[dt] = float(loss)
        if dt == torch.float32:  # sft_loss is the mean response cross-entropy, nothing else
            with torch.no_grad():
                logits = m(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            ref = response_loss_objective(logits, ids, batch["response_mask"]).mean()
            assert abs(float(ref) - losses[dt]) < 1e-5
    assert abs(losses[torch.float32] - losses[torch.bfloat16]) < 0.05 * losses[torch.float32]


def test_hf_engine_from_model_runs_in_the_models_dtype_and_device():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import LABEL_WORDS, word_tokenizer

    from raydapt.engines.hf import HFEngine

    prompts = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10"]
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        eng = HFEngine.from_model(_tiny_llama(dt), word_tokenizer(40), LABEL_WORDS, max_length=16)
        assert eng.device == "cpu" and eng.model.dtype == dt
        out[dt] = eng.score(prompts)
        assert out[dt].label_logprobs.shape == (2, 3) and out[dt].hidden.shape == (2, 32)
        assert list(out[dt].prompt_tokens) == [3, 7]
    a, b = out[torch.float32], out[torch.bfloat16]
    assert abs(a.label_logprobs - b.label_logprobs).max() < 0.05
    # batched (left-padded) scoring equals scoring each prompt alone
    eng = HFEngine.from_model(_tiny_llama(torch.float32), word_tokenizer(40), LABEL_WORDS)
    one = eng.score(prompts[:1])
    assert abs(one.label_logprobs[0] - a.label_logprobs[0]).max() < 1e-4
