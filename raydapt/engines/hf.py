"""transformers engine (CPU or GPU): last-token hidden states and label-word log-probs.

Prompts are left-padded so position -1 is every prompt's last real token; only the last
position's logits are computed (``logits_to_keep=1``), which on a 49K vocabulary is most of the
saving on CPU. Use fp32 on CPU (bf16 measured ~6x slower on this class of machine).
"""

from __future__ import annotations

import numpy as np
import torch

from raydapt.core.assets import resolve_model
from raydapt.engines.base import EngineOutput, PromptFormatter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(PromptFormatter):
    """A causal LM from transformers behind the :class:`~raydapt.engines.base.Engine` protocol.

    Args:
        model: model reference (``pkg:...``, ``hf:...``, a path).
        label_words: verbalizer words in label order, e.g. ``[" negative", " positive"]``.
        max_length: prompt tokens kept; longer prompts lose tokens on the left (the end of the
            prompt, where the question and answer cue are, is kept).
        dtype: weights dtype; ``auto`` = bf16 on CUDA, fp32 on CPU.
        device: ``cpu``, ``cuda`` or ``auto``.
        chat: wrap each prompt in the tokenizer's chat template (user turn + generation prompt).
        answer_prefix: text appended after the (chat-formatted) prompt, e.g. "The sentiment is",
            so the next token is the label word.
    """

    def __init__(
        self, model: str, label_words: list[str], *, max_length: int = 512,
        dtype: str = "float32", device: str = "auto", chat: bool = False, answer_prefix: str = "",
        trust_remote_code: bool = False, revision: str | None = None,
        num_threads: int | None = None, token: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        rm = resolve_model(model)
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        if dtype == "auto":
            tdtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            tdtype = _DTYPES[dtype]
        tok = AutoTokenizer.from_pretrained(
            rm.path, revision=revision or rm.revision, trust_remote_code=trust_remote_code,
            token=token)
        self._init_text(tok, label_words, model=model, chat=chat, answer_prefix=answer_prefix,
                        max_length=max_length)
        self.model = AutoModelForCausalLM.from_pretrained(
            rm.path, revision=revision or rm.revision, dtype=tdtype,
            trust_remote_code=trust_remote_code, use_safetensors=True if rm.local else None,
            token=token,
        ).to(self.device).eval()
        self.model_ref = model

    @classmethod
    def from_model(cls, model, tokenizer, label_words: list[str], *, max_length: int = 512,
                   chat: bool = False, answer_prefix: str = "", name: str = "in-memory"):
        """An engine around an already-built causal LM and tokenizer (random-init benchmarks,
        tests): runs on the model's device in the model's dtype, nothing is loaded."""
        self = cls.__new__(cls)
        self.device = str(next(model.parameters()).device)
        self._init_text(tokenizer, label_words, model=name, chat=chat,
                        answer_prefix=answer_prefix, max_length=max_length)
        self.model = model.eval()
        self.model_ref = name
        return self

    @torch.inference_mode()
    def score(self, prompts: list[str]) -> EngineOutput:
        """[B] prompts -> hidden [B, H], label_logprobs [B, C], prompt_tokens [B]."""
        enc = self.tokenize(prompts, return_tensors="pt", padding=True).to(self.device)
        out = self.model(**enc, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, -1].float()
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, self._label_ids]
        return EngineOutput(
            hidden=hidden.cpu().numpy(), label_logprobs=logp.cpu().numpy(),
            prompt_tokens=enc["attention_mask"].sum(1).cpu().numpy().astype(np.int64),
        )
