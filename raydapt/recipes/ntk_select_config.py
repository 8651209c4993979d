"""NTK-Selector job config: pool and domain tasks, QA format, LoRA, the two fits, selection and evaluation. (Recipe: :mod:`raydapt.recipes.ntk_select`.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from raydapt.config import (
    ActorPoolSection,
    DataInput,
    JobBase,
    ModelInput,
    Section,
    check_template,
    data_root,
)
from raydapt.train.settings import LoRATrain


class QATaskData(Section):
    """One multiple-choice domain task: a QA file, and how D and the test items are drawn."""

    path: str = Field(..., description="QA file relative to data.root (jsonl/parquet/csv).")
    name: str | None = Field(None, description="Task name in results (default: file stem).")
    domain_rows: int = Field(64, ge=0, description="Rows of this task in the domain set D.")
    eval_rows: int | None = Field(
        200, ge=1, description="Test items evaluated (seeded subsample; None = all).")


class NTKData(Section):
    """The general pool C and the domain tasks (D is drawn from them, disjoint from the tests)."""

    root: str = Field("${RAYDAPT_DATA:-../shared/data}", description="Paths are relative to it.")
    pool: list[str] = Field(
        default_factory=lambda: ["cot_pool/flan_cot.jsonl", "cot_pool/gsm8k_train.jsonl"],
        min_length=1, description="The general chain-of-thought pool: QA files, directories "
        "(every jsonl / parquet / csv file below) or glob patterns, streamed (never held by the "
        "driver); an id must be unique across all of them.")
    max_pool_rows: int | None = Field(None, ge=1, description="Seeded subsample of the pool.")
    pool_unit_rows: int = Field(
        10_000, ge=1, description="Pool rows per read unit = per stage-1 output shard (the "
        "resume unit of the streamed pool; a large jsonl file is read as several units).")
    tasks: list[QATaskData] = Field(
        default_factory=lambda: [QATaskData(path="medical/pubmedqa.jsonl"),
                                 QATaskData(path="medical/medmcqa.jsonl")],
        min_length=1, description="Domain tasks: rows with split=train (if any) feed D, the "
        "others are split by a seeded id hash; D and the evaluated items never overlap.")


class QAFormatSection(Section):
    """How a QA row becomes prompt and response text (see raydapt.data.qa.QAFormat)."""

    prompt: str = "{context}{question}{options}"
    response: str = "{rationale}The answer is {answer}."
    answer_prefix: str = Field(
        "The answer is", description="Response start put after the prompt in MC evaluation.")
    chat: bool = Field(True, description="Wrap prompts in the model's chat template.")
    max_length: int = Field(192, gt=16, description="Tokens per prompt+response (train, scoring).")
    context_max_chars: int = Field(1200, ge=0)
    rationale_max_chars: int = Field(600, ge=0)

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, v: str) -> str:
        return check_template(v, allowed=("context", "question", "options"),
                              required=("question",))

    @field_validator("response")
    @classmethod
    def _response_fields(cls, v: str) -> str:
        return check_template(v, allowed=("rationale", "answer"), required=("answer",))


class LoRASection(Section):
    """The LoRA adapter (peft)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class LoRATrainSection(Section):
    """A LoRA fit on Ray Train with DeepSpeed."""

    # the defaults are LoRATrain's (raydapt.train.settings): every setting is defined once

    num_workers: int = Field(LoRATrain.num_workers, ge=1,
                             description="Ray Train workers (gloo on CPU, NCCL on GPU).")
    use_gpu: bool = LoRATrain.use_gpu
    cpus_per_worker: float = Field(LoRATrain.cpus_per_worker, gt=0)
    threads: int | None = Field(LoRATrain.threads, ge=1,
                                description="torch threads per worker (CPU).")
    epochs: int = Field(LoRATrain.epochs, ge=1)
    batch_size: int = Field(LoRATrain.batch_size, ge=1,
                            description="Global batch (micro batch x accum x workers).")
    grad_accum: int = Field(LoRATrain.grad_accum, ge=1)
    lr: float = Field(LoRATrain.lr, gt=0)
    weight_decay: float = Field(LoRATrain.weight_decay, ge=0)
    warmup_ratio: float = Field(LoRATrain.warmup_ratio, ge=0, lt=1)
    zero_stage: Literal[0, 1, 2, 3] = Field(LoRATrain.zero_stage,  # type: ignore[assignment]
                                            description="DeepSpeed ZeRO stage.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        LoRATrain.dtype,  # type: ignore[assignment]
        description="float32 on CPU (fp16 is refused there), bfloat16 on GPUs.")
    offload_optimizer: bool = LoRATrain.offload_optimizer
    gradient_checkpointing: bool = LoRATrain.gradient_checkpointing
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. "
        "{train_gpu: 1}: steers the workers to the node type that offers them (cluster/).")


class NTKSelectSection(Section):
    """Stage 1 (embedding votes), stage 2 (projected per-sample gradients), selectors."""

    selectors: list[Literal["ntk", "embedding", "random", "less"]] = Field(
        default_factory=lambda: ["ntk", "embedding", "random", "less"],
        description="Selections to fine-tune and evaluate (each gives S, |S| = n).")
    baselines: list[Literal["base", "domain_only"]] = Field(
        default_factory=lambda: ["base", "domain_only"])
    n: int | None = Field(None, ge=1, description="N selected; None = n_factor x |D|.")
    n_factor: float = Field(9.0, gt=0, description="N = n_factor x |D| (paper: 9).")
    m_factor: float = Field(4.0, ge=1, description="Stage 1 keeps M = m_factor x N candidates.")
    k: int = Field(64, ge=1, description="Nearest pool samples each domain sample votes for.")
    index: Literal["flat", "ivf", "hnsw"] = Field(
        "flat", description="Stage-1 kNN index over the pool's embeddings, read shard by "
        "shard: flat (exact, memory |D|·k), ivf (FAISS IVF-Flat, trained on the first "
        "index_train_rows) or hnsw (FAISS HNSW): approximate, for pools of millions.")
    index_nlist: int | None = Field(None, ge=1, description="IVF lists (None: ~4·√rows).")
    index_nprobe: int = Field(16, ge=1, description="IVF lists searched.")
    index_train_rows: int = Field(50_000, ge=1, description="Pool rows the IVF is trained on.")
    proj_dim: int = Field(8192, ge=1, description="p, Rademacher projection dimension.")
    proj_seed: int = Field(0, description="Projection seed (same for domain and pool).")
    proj_chunk_rows: int = Field(1024, ge=256, description="Projection chunk (memory knob).")
    score: Literal["inner", "cosine"] = Field("inner", description="NTK score s_j.")
    shard_rows: int = Field(64, ge=1, description="Candidates per stage-2 shard (resume unit).")
    grad_method: Literal["hooks", "vmap", "loop"] = Field(
        "hooks", description="Per-sample gradients: hooks (one batched backward + per-layer "
        "outer products), vmap (torch.func) or loop (batch size 1); see per_sample_grads.")
    grad_micro_batch: int | None = Field(
        8, ge=1, description="Rows per per-sample-gradient call (activation memory); each "
        "grad_pool batch is projected at once, so grad_pool.batch_size can be much larger.")
    vmap_chunk: int | None = Field(None, ge=1, description="Samples vectorised at once (vmap).")
    embed_pool: ActorPoolSection = Field(default_factory=ActorPoolSection)
    grad_pool: ActorPoolSection = Field(
        default_factory=lambda: ActorPoolSection(batch_size=32, threads=2))

    def sizes(self, domain_rows: int, pool_rows: int | None) -> tuple[int, int | None]:
        """N (rows selected) and M (stage-1 candidates) for ``domain_rows`` in D and
        ``pool_rows`` in the pool: N = ``n`` or max(1, round(n_factor |D|)), M =
        max(N, ceil(m_factor N)), both at most the pool (M None while the pool size is
        unknown). The one formula the recipe, ``raydapt plan`` and the benchmarks use."""
        n = self.n or max(1, round(self.n_factor * domain_rows))
        if pool_rows is None:
            return n, None
        n = min(pool_rows, n)
        return n, min(pool_rows, max(n, math.ceil(self.m_factor * n)))


class NTKEvalSection(Section):
    """Multiple-choice evaluation by option-letter log-probs."""

    max_length: int = Field(384, gt=16, description="Prompt tokens kept (left truncation).")
    nll: bool = Field(False, description="Also the mean per-token NLL of the gold response "
                      "(rationale + answer) on the test items, per variant (results: response_nll).")
    pool: ActorPoolSection = Field(default_factory=lambda: ActorPoolSection(threads=2))


class NTKSelectJob(JobBase):
    """NTK-Selector: warm-up LoRA on D, select S from a general pool, LoRA on D ∪ S, evaluate."""

    method: Literal["ntk_select"] = "ntk_select"
    data: NTKData = Field(default_factory=NTKData)
    model: str = Field("pkg:smollm2-135m-instruct", description="Base instruction LLM.")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Weights dtype of the scoring / eval actors.")
    format: QAFormatSection = Field(default_factory=QAFormatSection)
    lora: LoRASection = Field(default_factory=LoRASection)
    warmup: LoRATrainSection = Field(default_factory=LoRATrainSection)
    select: NTKSelectSection = Field(default_factory=NTKSelectSection)
    finetune: LoRATrainSection = Field(default_factory=LoRATrainSection)
    eval: NTKEvalSection = Field(default_factory=NTKEvalSection)

    def inputs(self) -> tuple[list[ModelInput], list[DataInput]]:
        from raydapt.data.readers import DataError, resolve_files

        root = data_root(self.data.root)
        pool = []
        for i, p in enumerate(self.data.pool):  # a directory or glob: every file it names
            try:
                files = resolve_files(root / p)
            except DataError:
                files = [str(root / p)]  # preflight names it: not found
            pool += [DataInput(f"data.pool[{i}]", Path(f)) for f in files]
        return ([ModelInput("model", self.model)],  # the LoRA base (also the scoring model)
                pool
                + [DataInput(f"data.tasks[{i}].path", root / t.path)
                   for i, t in enumerate(self.data.tasks)])
