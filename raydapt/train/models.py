"""Encoder classifiers (BERT-class) split into steps that losses can enter at any level.

``EncoderClassifier`` wraps a transformers encoder (``AutoModel``) plus a linear head and exposes
the forward pass in four steps so MixUp can interpolate at the word-embedding, encoder-output or
pooled level, and similarity losses can read the pooled representation::

    e = model.embed(input_ids)                 # [B, T, D]  word-embedding-layer output
    h = model.encode(e, attention_mask)        # [B, T, D]  last encoder layer
    z = model.pool(h, attention_mask)          # [B, D]     pooled representation h_S(x)
    logits = model.head(z)                     # [B, C]

``model(input_ids, attention_mask)`` returns ``(logits, pooled)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from raydapt.core.assets import resolve_model


class EncoderClassifier(nn.Module):
    """A pretrained encoder with a linear classification head.

    Args:
        model_ref: a model reference (``pkg:all-minilm-l6-v2``, ``hf:bert-base-uncased``, a path).
        num_labels: C, the head's output width (classes, or labels for multi-label).
        pooling: ``cls`` (first token) or ``mean`` (mask-weighted mean of the last layer).
        dropout: dropout before the head.
        encoder: an already-built encoder (tests use a tiny random-init one); overrides model_ref.
    """

    def __init__(
        self,
        model_ref: str | None,
        num_labels: int,
        *,
        pooling: Literal["cls", "mean"] = "mean",
        dropout: float = 0.1,
        encoder: nn.Module | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if encoder is None:
            from transformers import AutoModel

            if model_ref is None:
                raise ValueError("EncoderClassifier needs a model_ref or an encoder")
            rm = resolve_model(model_ref)
            encoder = AutoModel.from_pretrained(
                rm.path, revision=rm.revision, trust_remote_code=trust_remote_code,
                use_safetensors=True if rm.local else None,
            )
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused (we pool ourselves); DDP rejects unused parameters
        self.encoder = encoder
        self.pooling = pooling
        width = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word-embedding-layer output, [B, T] -> [B, T, D] (positions are added in encode)."""
        return self.encoder.get_input_embeddings()(input_ids)

    def encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the encoder from word embeddings: [B, T, D], [B, T] -> [B, T, D]."""
        out = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, D], [B, T] -> [B, D]."""
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, D] -> logits [B, C]."""
        return self.classifier(self.dropout(pooled))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] token ids and mask -> (logits [B, C], pooled [B, D])."""
        h = self.encode(self.embed(input_ids), attention_mask)
        z = self.pool(h, attention_mask)
        return self.head(z), z


def tiny_bert(vocab_size: int = 128, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """A random-init 2-layer BERT built from a config: fast plumbing tests, no weights needed."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256,
    )
    return BertModel(cfg)


def random_llama(out, *, tokenizer: str = "pkg:smollm2-135m-instruct", hidden: int = 32,
                 layers: int = 2, seed: int = 0):
    """A random-init Llama (``layers`` layers of width ``hidden``, 4 heads, 2 KV heads) over
    ``tokenizer``'s vocabulary, saved with that tokenizer (and its chat template) to ``out``: a
    local model reference for NTK-Selector's tests and rehearsals, where the platform's cost,
    not the model's, is under test. Returns ``out`` as a Path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydapt.core.assets import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)
