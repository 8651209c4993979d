"""Building an engine: the kwargs an engine config section stands for (with the vLLM -> hf switch
for passes that need hidden states), and the engine itself. Imports the chosen backend only."""

from __future__ import annotations

from typing import Any


def engine_kwargs(t, *, need_hidden: bool = False) -> dict[str, Any]:
    """Engine kwargs for a pass. vLLM gives no hidden states, so a pass that needs keys /
    teacher representations runs the same model on the hf engine (the documented switch).
    ``t``: an engine config section (``raydapt.config.EngineSection`` with a ``pool``)."""
    backend = "hf" if (need_hidden and t.backend == "vllm") else t.backend
    kw = {"backend": backend, "model": t.model, "max_length": t.max_length, "dtype": t.dtype,
          "chat": t.chat, "answer_prefix": t.answer_prefix,
          "trust_remote_code": t.trust_remote_code, "revision": t.revision,
          "device": t.device,
          "num_threads": t.pool.threads or max(1, int(round(t.pool.num_cpus)))}
    if backend == "vllm":
        kw["engine_kwargs"] = dict(t.vllm)
    else:
        kw["token"] = t.hf_token
    return kw


def make_engine(engine: dict[str, Any], label_words: list[str]):
    """Build the engine a config section names (``backend: hf | vllm``)."""
    kw = dict(engine)
    backend = kw.pop("backend", "hf")
    if backend == "hf":
        from raydapt.engines.hf import HFEngine

        return HFEngine(label_words=label_words, **kw)
    if backend == "vllm":
        from raydapt.engines.vllm import VLLMEngine

        return VLLMEngine(label_words=label_words, **kw)
    raise ValueError(f"unknown engine backend {backend!r}")
