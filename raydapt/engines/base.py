"""The engine protocol: what SimDA (and later NTK-Selector) asks of an LLM.

One forward pass over a batch of prompts yields both

- ``hidden``  [B, H] float32: the final-layer hidden state at the last prompt token (prompts are
  left-padded so the last position is the last real token), SimDA's key q(x) / h_T(x);
- ``label_logprobs`` [B, C] float32: next-token log-probabilities of the C verbalizer tokens after
  the prompt (log-softmax over the *full* vocabulary; renormalise over C for p_LLM).

Backends: :class:`raydapt.engines.hf.HFEngine` (transformers, CPU/GPU) and
:class:`raydapt.engines.vllm.VLLMEngine` (vLLM, GPU; imported lazily).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from raydapt import RaydaptError
from raydapt.data.text import truncate_text


class VerbalizerError(RaydaptError):
    """A label word that is not exactly one token for the engine's tokenizer."""


@dataclass
class EngineOutput:
    hidden: np.ndarray | None  # [B, H] float32, None if the backend cannot give it
    label_logprobs: np.ndarray  # [B, C] float32
    prompt_tokens: np.ndarray  # [B] int, prompt length in tokens (after truncation)


class Engine(Protocol):
    """An LLM that scores prompts. Implementations are created inside Ray actors."""

    def label_token_ids(self) -> list[int]:
        """The single-token id of each verbalizer word, in label order."""
        ...

    def score(self, prompts: list[str]) -> EngineOutput:
        """One forward pass over ``prompts``: last-token hidden states and label log-probs."""
        ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        ...

    def truncate(self, text: str, max_tokens: int, side: str = "head") -> str:
        """The text cut to at most ``max_tokens`` tokens (decoded back to a string), keeping its
        head, tail or both (``side``)."""
        ...


def check_single_tokens(words: dict[str, list[int]], tokenizer_name: str) -> list[int]:
    """Validate that each label word maps to exactly one token; returns the ids in order."""
    bad = {w: ids for w, ids in words.items() if len(ids) != 1}
    if bad:
        detail = "; ".join(f"{w!r} -> {len(ids)} tokens {ids}" for w, ids in bad.items())
        raise VerbalizerError(
            f"each verbalizer word must be a single token for {tokenizer_name}: {detail}. "
            "Pick words that are one token (usually with a leading space, e.g. ' positive')."
        )
    ids = [v[0] for v in words.values()]
    if len(set(ids)) != len(ids):
        raise VerbalizerError(f"verbalizer words share a token: {dict(zip(words, ids))}")
    return ids


def renormalise(label_logprobs: np.ndarray) -> np.ndarray:
    """log-probs over the full vocabulary [B, C] -> a distribution over the C labels [B, C]."""
    z = label_logprobs - label_logprobs.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


class PromptFormatter:
    """The text side both engines share (they must tokenise identically): chat template, answer
    prefix, left truncation, verbalizer ids. Needs ``tok``, ``chat``, ``answer_prefix``,
    ``max_length`` and ``_label_ids`` set by the engine (see :meth:`_init_text`)."""

    tok: Any
    chat: bool
    answer_prefix: str
    max_length: int
    _label_ids: list[int]

    def _init_text(self, tok: Any, label_words: list[str], *, model: str, chat: bool,
                   answer_prefix: str, max_length: int) -> None:
        tok.padding_side = "left"
        tok.truncation_side = "left"  # keep the end of a prompt: the question and answer cue
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tok, self.chat, self.answer_prefix = tok, chat, answer_prefix
        self.max_length = max_length
        words = {w: tok(w, add_special_tokens=False)["input_ids"] for w in label_words}
        self._label_ids = check_single_tokens(words, model)

    def label_token_ids(self) -> list[int]:
        return list(self._label_ids)

    def format(self, prompt: str) -> str:
        """Apply the chat template (when ``chat``) to one prompt, then the answer prefix."""
        if self.chat:
            prompt = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return prompt + self.answer_prefix

    def tokenize(self, prompts: list[str], **kw: Any) -> Any:
        """Formatted, left-truncated tokenisation of prompts (no second BOS after a template)."""
        return self.tok([self.format(p) for p in prompts], truncation=True,
                        max_length=self.max_length, add_special_tokens=not self.chat, **kw)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of one prompt as :meth:`tokenize` makes it (template, prefix, special tokens),
        before truncation to ``max_length``."""
        return len(self.tok(self.format(prompt), add_special_tokens=not self.chat)["input_ids"])

    def truncate(self, text: str, max_tokens: int, side: str = "head") -> str:
        """The text cut to at most ~``max_tokens`` tokens (:func:`raydapt.data.text.truncate_text`:
        ``head``, ``tail`` or ``head_tail``)."""
        return truncate_text(self.tok, text, max_tokens, side)
