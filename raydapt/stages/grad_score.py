"""Ray Data stages of NTK-Selector: embed (stage 1), per-sample gradients (stage 2), MC scoring.

Each is a callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))`` that
loads the base model plus a LoRA adapter once per actor. Batches are pandas DataFrames carrying
``id``; failing rows come back with an ``_error`` reason (recipe → rejects).

- :class:`EncodeQA`: QA rows → ``input_ids``, ``response_mask`` (the tokenising step of a
  streamed pool; a row that does not fit gets an ``_error``).
- :class:`EmbedLM`: ``input_ids``, ``response_mask`` → ``emb`` [H] (mean of the final hidden
  states over the sample's real tokens, fp32).
- :class:`GradProject`: ``input_ids``, ``response_mask`` → ``g`` [p] = Π ∇_θ F(x) (projected
  per-sample gradient of the NTK objective or the response loss, optionally Adam-preconditioned
  before the projection), or directly the ``score`` against a given ḡ_D / domain gradients.
- :class:`MCScore`: ``prompt`` (chat-formatted prompt + answer prefix), ``n_options`` →
  ``letter_logp`` [n_options] and ``pred`` (argmax letter index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from raydapt.data.qa import QAFormat, encode_table, pad_batch
from raydapt.engines.base import check_single_tokens
from raydapt.select.ntk import (
    RademacherProjector,
    adam_precondition,
    flat_dim,
    less_scores,
    ntk_scores,
    per_sample_grads,
    trainable_params,
)
from raydapt.stages.common import ERROR_COLUMN, Stage
from raydapt.train.lora import load_causal_lm


def _load(model: dict[str, Any]):
    if model.get("threads"):
        torch.set_num_threads(int(model["threads"]))
    device = model.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    net, tok = load_causal_lm(model["model"], dtype=model.get("dtype", "float32"), device=device,
                              adapter=model.get("adapter"))
    return net.eval(), tok, device


def _pad(batch: pd.DataFrame, pad_id: int, device: str, side: str = "right"):
    encs = [{"input_ids": list(a), "response_mask": list(m)}
            for a, m in zip(batch["input_ids"], batch["response_mask"])]
    return {k: v.to(device) for k, v in pad_batch(encs, pad_id=pad_id, side=side).items()}


ENCODE_ERROR = "encode: "
"""Prefix of the ``_error`` of a row :class:`EncodeQA` could not encode (a later step's errors
carry their stage's name instead), so a streamed output tells the two apart."""


class EncodeQA:
    """QA rows (:data:`raydapt.data.qa.QA_COLUMNS`) → ``keep`` columns + ``input_ids`` [L] +
    ``response_mask`` [L] (prompt + gold response, :func:`raydapt.data.qa.encode_table`,
    at most ``max_length`` tokens); a row that does not fit gets ``_error``
    (:data:`ENCODE_ERROR` + the reason). A :class:`~raydapt.stages.sharded.Step` of a streamed
    pool (the tokenizer is loaded once per actor).

    Args:
        model: the model reference whose tokenizer encodes (padding with EOS).
        max_length: tokens per prompt + response.
        fmt: the QA templates (a :class:`QAFormat` or its fields as a dict).
        chat: wrap the prompt in the model's chat template.
        keep: input columns copied to the output besides ``id`` (e.g. ``source``).
    """

    def __init__(self, model: str, max_length: int, fmt: QAFormat | dict[str, Any] | None = None,
                 chat: bool = False, keep: tuple[str, ...] = ()) -> None:
        from raydapt.core.assets import load_tokenizer

        self.tok = load_tokenizer(model, pad_to_eos=True)
        self.max_length = max_length
        self.fmt = fmt if isinstance(fmt, QAFormat) else QAFormat(**(fmt or {}))
        self.chat = chat
        self.keep = ("id", *keep)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows, rej = encode_table(batch, self.tok, self.fmt, max_length=self.max_length,
                                 chat=self.chat, keep=self.keep)
        rows = rows.assign(**{ERROR_COLUMN: ""})
        if len(rej):
            rows = pd.concat([rows, pd.DataFrame({"id": rej["id"], ERROR_COLUMN: [
                ENCODE_ERROR + r for r in rej["reason"]]})], ignore_index=True)
        return rows


class EmbedLM(Stage):
    """Mean-pooled final hidden states of (prompt + response) sequences.

    Args:
        model: {model, adapter, dtype, threads, device} (see :func:`load_causal_lm`).
        keep: input columns copied to the output (e.g. ``input_ids``, ``response_mask``,
            ``source``: a streamed stage-1 output then carries what stage 2 and the fine-tune
            need).
    """

    def __init__(self, *, model: dict[str, Any], stage: str = "embed",
                 telemetry: dict[str, str] | None = None, keep: tuple[str, ...] = ()) -> None:
        super().__init__(stage, telemetry)
        self.net, self.tok, self.device = _load(model)
        self.keep = tuple(keep)

    @torch.inference_mode()
    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        b = _pad(batch, self.tok.pad_token_id, self.device)
        out = self.net(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1].float()  # [B, T, H]
        m = b["attention_mask"].unsqueeze(-1).float()
        emb = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, H]
        return pd.DataFrame({"id": batch["id"].to_numpy(), "emb": list(emb.cpu().numpy())})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = super().__call__(batch)
        if self.keep:  # also on rows that failed: their tokens stay usable (fine-tune, stage 2)
            src = batch.drop_duplicates("id").set_index("id").loc[out["id"], list(self.keep)]
            for c in self.keep:
                out[c] = src[c].to_numpy()
        return out


class GradProject(Stage):
    """Projected per-sample gradients of the NTK objective (or the LESS loss) w.r.t. LoRA.

    Args:
        model: {model, adapter, dtype, threads, device}.
        objective: ``logit_sum`` (NTK-Selector's F) or ``loss`` (LESS).
        proj_dim / proj_seed / chunk_rows: the Rademacher projection (same seed for domain and
            pool, so their projected gradients live in one space).
        adam_state: path of ``adam_exp_avg_sq.pt`` to precondition (g / (√v + eps)) before
            projecting (LESS); None = plain gradients.
        score_against: None → output ``g`` [p]; else a [p] mean domain gradient (score kind
            ``inner``/``cosine``) or a [Nd, p] matrix (``less``: max cosine), output ``score``.
        grad_method: ``hooks`` (default), ``vmap`` or ``loop`` (see ``per_sample_grads``).
        micro_batch: rows per gradient computation (activation memory); the whole Ray Data
            batch is projected at once (Π is expanded once per batch: make batches large).
        vmap_chunk: samples vectorised at once (``vmap`` memory knob).
    """

    def __init__(self, *, model: dict[str, Any], objective: str, proj_dim: int, proj_seed: int,
                 chunk_rows: int = 1024, adam_state: str | None = None,
                 score_against: np.ndarray | None = None, score_kind: str = "inner",
                 vmap_chunk: int | None = None, grad_method: str = "hooks",
                 micro_batch: int | None = None, stage: str = "grad",
                 telemetry: dict[str, str] | None = None) -> None:
        super().__init__(stage, telemetry)
        self.net, self.tok, self.device = _load({**model, "trainable": True})
        for n, p in self.net.named_parameters():  # LoRA parameters are the θ of the kernel
            p.requires_grad_("lora_" in n)
        self.params = trainable_params(self.net)
        self.proj = RademacherProjector(flat_dim(self.params), proj_dim, seed=proj_seed,
                                        chunk_rows=chunk_rows)
        self.objective = objective
        self.adam_v = None
        if adam_state is not None:
            st = torch.load(adam_state, weights_only=True)
            if st["exp_avg_sq"].numel() != self.proj.in_dim:
                raise ValueError(f"Adam state has {st['exp_avg_sq'].numel()} entries, the LoRA "
                                 f"parameters {self.proj.in_dim}")
            self.adam_v = st["exp_avg_sq"].to(self.device)
        self.against = None if score_against is None else torch.as_tensor(
            np.asarray(score_against, dtype=np.float32), device=self.device)
        self.score_kind = score_kind
        self.vmap_chunk = vmap_chunk
        self.grad_method = grad_method
        self.micro_batch = micro_batch

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        # gradients per length-sorted micro-batch (little padding), one projection per batch:
        # the projection's cost is mostly fixed per call (expanding Π), so batches amortise it
        order = np.argsort([len(a) for a in batch["input_ids"]], kind="stable")
        g = torch.empty(len(batch), self.proj.in_dim, dtype=torch.float32, device=self.device)
        step = self.micro_batch or len(batch)
        for i in range(0, len(batch), step):
            ix = order[i: i + step]
            b = _pad(batch.iloc[ix], self.tok.pad_token_id, self.device)
            g[torch.as_tensor(ix, device=self.device)] = per_sample_grads(
                self.net, b["input_ids"], b["attention_mask"], b["response_mask"],
                params=self.params, objective=self.objective,
                method=self.grad_method,  # type: ignore[arg-type]
                chunk_size=self.vmap_chunk)  # [b, P]
        if not torch.isfinite(g).all():
            raise FloatingPointError("non-finite gradient")
        if self.adam_v is not None:
            g = adam_precondition(g, exp_avg_sq=self.adam_v)
        gp = self.proj.project(g)  # [B, p]
        out = pd.DataFrame({"id": batch["id"].to_numpy()})
        if self.against is None:
            out["g"] = list(gp.cpu().numpy())
        elif self.against.dim() == 2:
            out["score"] = less_scores(self.against, gp).cpu().numpy()
        else:
            out["score"] = ntk_scores(self.against, gp, kind=self.score_kind).cpu().numpy()
        return out

    def counts(self, out: pd.DataFrame, good: int) -> dict[str, int]:
        return {"gradients": good}


def letter_logprobs(net, tok, prompts: list[str], letter_ids: list[int], *, device: str,
                    max_length: int) -> np.ndarray:
    """Log-probs of the option letters as the next token after each prompt.

    Args:
        prompts: B fully formatted prompts (chat template + answer prefix applied), as text.
        letter_ids: C token ids (e.g. of " A", " B", ...).

    Returns:
        [B, C] fp32 log-probabilities (over the full vocabulary) of each letter token.
    """
    tok.padding_side, tok.truncation_side = "left", "left"
    enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
              add_special_tokens=False).to(device)
    with torch.inference_mode():
        out = net(**enc, logits_to_keep=1)
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    return logp[:, letter_ids].cpu().numpy()


class MCScore(Stage):
    """Multiple-choice scoring by the log-prob of each option letter after the answer prefix.

    Deterministic: no sampling; the prediction is the argmax letter among the row's options.

    Args:
        model: {model, adapter, dtype, threads, device}.
        letters: all letters that may occur (e.g. ``["A", ..., "J"]``); each ``" X"`` must be a
            single token.
        max_length: prompt tokens kept (left truncation).
    """

    def __init__(self, *, model: dict[str, Any], letters: list[str], max_length: int,
                 stage: str = "eval", telemetry: dict[str, str] | None = None) -> None:
        super().__init__(stage, telemetry)
        self.net, self.tok, self.device = _load(model)
        words = {f" {x}": self.tok(f" {x}", add_special_tokens=False)["input_ids"]
                 for x in letters}
        self.letter_ids = check_single_tokens(words, model["model"])
        self.max_length = max_length

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        lp = letter_logprobs(self.net, self.tok, list(batch["prompt"]), self.letter_ids,
                             device=self.device, max_length=self.max_length)
        n = batch["n_options"].to_numpy()
        rows = [lp[i, : int(n[i])] for i in range(len(batch))]
        return pd.DataFrame({"id": batch["id"].to_numpy(), "letter_logp": rows,
                             "pred": [int(np.argmax(r)) for r in rows]})


def response_nll(net, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood of each sequence's response tokens under ``net``.

    Token t counts when ``response_mask[t]`` is 1 (t ≥ 1), predicted by the logits at t - 1.

    Args:
        input_ids / attention_mask / response_mask: [B, T], right-padded (pad_batch).

    Returns:
        (nll_sum [B] fp64, n_tokens [B] int64): the mean per-token NLL of a set of items is
        Σ nll_sum / Σ n_tokens.
    """
    with torch.inference_mode():
        logits = net(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        target = input_ids[:, 1:]
        m = (response_mask[:, 1:] * attention_mask[:, 1:]).bool()
        b, t = torch.nonzero(m, as_tuple=True)  # only the response positions: [n]
        lp = torch.log_softmax(logits[b, t].float(), dim=-1)
        nll = -lp.gather(1, target[b, t][:, None])[:, 0].double()
        total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=nll.device)
        total.index_add_(0, b, nll)
    return total.cpu().numpy(), m.sum(dim=1).cpu().numpy().astype(np.int64)


class ResponseNLL(Stage):
    """Gold-response negative log-likelihood (prompt given) of encoded QA rows.

    ``input_ids``, ``response_mask`` (as :func:`raydapt.data.qa.encode_pair` makes them) →
    ``nll_sum`` (summed over the response tokens) and ``n_tokens``.

    Args:
        model: {model, adapter, dtype, threads, device}.
    """

    def __init__(self, *, model: dict[str, Any], stage: str = "eval-nll",
                 telemetry: dict[str, str] | None = None) -> None:
        super().__init__(stage, telemetry)
        self.net, self.tok, self.device = _load(model)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        b = _pad(batch, self.tok.pad_token_id, self.device)
        s, n = response_nll(self.net, b["input_ids"], b["attention_mask"], b["response_mask"])
        return pd.DataFrame({"id": batch["id"].to_numpy(), "nll_sum": s, "n_tokens": n})
