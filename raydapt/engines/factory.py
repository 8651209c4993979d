"""Building an engine from plain arguments (a job config section turns itself into them, e.g.
``TeacherSection.engine_args``). Imports the chosen backend only."""

from __future__ import annotations

from typing import Any


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
