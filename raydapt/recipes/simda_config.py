"""SimDA job config: the data, teacher, annotation and distillation sections. (Recipe: :mod:`raydapt.recipes.simda`.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydapt.config import (
    ActorPoolSection,
    EngineSection,
    JobBase,
    Section,
    TrainSection,
)


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


class SimDAJob(JobBase):
    """SimDA: kNN-augmented LLM annotation of the target, then similarity-based distillation."""

    method: Literal["simda"] = "simda"
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
