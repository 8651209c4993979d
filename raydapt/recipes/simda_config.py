"""SimDA job config: the data, teacher, annotation and distillation sections. (Recipe: :mod:`raydapt.recipes.simda`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raydapt.config import (
    ActorPoolSection,
    DataInput,
    EngineSection,
    JobBase,
    ModelInput,
    Section,
    TrainSection,
    check_template,
    data_root,
)
from raydapt.train.settings import StudentTrain


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
    dev: DomainData | None = Field(
        None, description="A labelled file of a THIRD domain (neither source nor target), for "
        "annotate.select_on_dev: its rows are taken as targets of the source store to choose "
        "k, tau and lam across a domain shift (e.g. dvd.jsonl for books -> kitchen).")
    max_dev_rows: int | None = Field(None, ge=1, description="Seeded subsample of data.dev.")
    stream_target_train: bool = Field(
        False, description="Stream the target-train rows from the target file(s) to the "
        "stage cache instead of holding them in the driver: the teacher and kNN run as one "
        "chain of actor pools over read units of target_unit_rows, annotations and the "
        "distilled students' rows are written shard by shard, and the driver keeps per row "
        "only its id and p_LLM (the calibration). target.path may then be a file, a directory "
        "or a glob of many files. For target corpora too large for one process "
        "(docs/scale.md). Needs max_target_test_rows (the test split stays in the "
        "driver); not with select_on_target, an estimated calibrate_prior or "
        "teacher_prompt=knn_prompt, which need every target row at once.")
    target_unit_rows: int = Field(
        10_000, ge=1, description="Target rows per read unit = per output shard of the "
        "streamed target-train pass (data.stream_target_train): the unit a killed run resumes "
        "from; a large jsonl file is read as several units.")

    @model_validator(mode="after")
    def _distinct_labels(self) -> SimDAData:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


class TeacherSection(EngineSection):
    """The LLM that builds the data store and annotates target text."""

    # Default read-out: a cloze completion with the chat template off. Measured on books ->
    # kitchen with SmolLM2-135M-Instruct (docs/simda.md): the chat + question + "The sentiment
    # is" read-out scored 0.70 calibrated zero-shot, this one 0.85.
    max_length: int = Field(512, gt=8, description="Prompt tokens kept: the query is never "
                            "cut; demonstrations that do not fit are dropped, farthest first.")
    template: str = Field(
        "Review: {text}\nThe sentiment of this review is",
        description="Prompt T(x) (the user turn when chat is on); {text} is the input. The "
        "label word is read as the next token (after answer_prefix).",
    )
    answer_prefix: str = Field(
        "",
        description="Appended after the (chat-formatted) prompt; the label word comes next. "
        "With chat on, e.g. 'The sentiment is'.",
    )
    demo_template: str = Field(
        "Review: {text}\nThe sentiment of this review is {label}.\n\n",
        description="One demonstration in ICL / kNN-augmented prompts ({text}, {label}).",
    )
    text_max_tokens: int = Field(160, gt=4, description="Tokens of the input text kept.")
    text_truncation: Literal["head", "tail", "head_tail"] = Field(
        "head_tail", description="Which tokens of a long text are kept (query and "
        "demonstrations): its start, its end, or half of each (reviews often end with the "
        "verdict).")
    demo_max_tokens: int = Field(48, gt=4, description="Tokens kept per demonstration text.")
    templates: list[str] = Field(
        default_factory=list, description="Candidate templates: when given, each is scored "
        "zero-shot (calibrated as annotate.calibrate_llm) on template_select_rows labelled "
        "SOURCE rows and the best replaces `template` (choice and accuracies logged).")
    template_select_rows: int = Field(200, ge=2, description="Source rows that score the "
                                      "candidate templates.")
    chat: bool = Field(False, description="Wrap prompts in the model's chat template (off: a "
                       "plain completion; the tokenizer adds only its own special tokens, none "
                       "for SmolLM2).")
    verbalizer: dict[str, str] = Field(
        default_factory=lambda: {"negative": " negative", "positive": " positive"},
        description="Label -> word; each must be ONE token (leading space included).",
    )
    pool: ActorPoolSection = Field(default_factory=ActorPoolSection)

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        return check_template(v, allowed=("text",), required=("text",))

    @field_validator("demo_template")
    @classmethod
    def _demo_template_fields(cls, v: str) -> str:
        return check_template(v, allowed=("text", "label"), required=("text", "label"))

    @field_validator("templates")
    @classmethod
    def _templates_fields(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            try:
                check_template(t, allowed=("text",), required=("text",))
            except ValueError as exc:
                raise ValueError(f"templates[{i}] {t!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _vllm_replica_fits(self) -> TeacherSection:
        """A vLLM replica with tensor parallelism T needs T GPUs in its actor (pool.num_gpus)."""
        tp = self.vllm.get("tensor_parallel_size", 1)
        if self.backend == "vllm" and self.pool.num_gpus and tp > self.pool.num_gpus:
            raise ValueError(f"teacher.vllm.tensor_parallel_size={tp} needs teacher.pool.num_gpus"
                             f" >= {tp} (GPUs per replica), got {self.pool.num_gpus}")
        return self



    def engine_args(self, *, need_hidden: bool = False) -> dict[str, Any]:
        """The plain arguments of :func:`raydapt.engines.factory.make_engine` for one pass.
        vLLM gives no hidden states, so a pass that needs keys / teacher representations runs
        the same model on the hf engine (the documented switch)."""
        backend = "hf" if (need_hidden and self.backend == "vllm") else self.backend
        kw = {"backend": backend, "model": self.model, "max_length": self.max_length,
              "dtype": self.dtype, "chat": self.chat, "answer_prefix": self.answer_prefix,
              "trust_remote_code": self.trust_remote_code, "revision": self.revision,
              "device": self.device,
              "num_threads": self.pool.threads or max(1, int(round(self.pool.num_cpus)))}
        if backend == "vllm":
            kw["engine_kwargs"] = dict(self.vllm)
        else:
            kw["token"] = self.hf_token
        return kw

class AnnotateSection(Section):
    """kNN retrieval and the teacher distribution p_T = lam*p_kNN + (1-lam)*p_LLM."""

    k: int = Field(32, ge=1, description="Neighbours retrieved per target text.")
    tau: float = Field(1.0, gt=0, description="Temperature of exp(-d/tau) over neighbours.")
    distance_norm: Literal["median", "none"] = Field(
        "median", description="Divide distances by the median neighbour distance first."
    )
    lam: float = Field(0.5, ge=0, le=1, description="Weight of p_kNN (1 = pure kNN).")
    calibrate_llm: Literal["none", "domain_mean", "median", "prior"] = Field(
        "prior",
        description="Label-free calibration of p_LLM, fitted on the target-train rows, before "
        "mixing: prior = per-class log-biases so that the argmax over the target rows matches "
        "calibrate_prior (uniform by default; for two classes a threshold at the median "
        "margin); median = the same, two classes only; domain_mean divides p_LLM by its mean "
        "over the target rows; none keeps the raw distribution.",
    )
    calibrate_prior: list[float] | Literal["em", "bbse"] | None = Field(
        None, description="Class prior for calibrate_llm=prior, in label order (None = "
        "uniform; median always calibrates to the uniform prior). Must not come from target "
        "labels. em / bbse: estimated from the unlabelled target-train rows' p_LLM and the "
        "labelled source rows (EM, Saerens et al. 2002; black-box shift estimation, Lipton et "
        "al. 2018), then recorded as the list that ran; needs calibrate_llm=prior.")
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
    select_on_source: bool = Field(
        False, description="Choose k, tau and lam on the labelled source rows (leave-one-out "
        "kNN over the source store + the source rows' calibrated p_LLM; target labels never "
        "used) instead of the configured values; the curve is logged to MLflow.")
    select_on_dev: bool = Field(
        False, description="Choose k, tau and lam on data.dev, a labelled third domain taken "
        "as a target of the source store (its rows' neighbours in the store + their p_LLM, "
        "calibrated on the dev rows as the target's is on the target rows; target labels never "
        "used): a source choice sees same-domain neighbours and over-weights kNN across a "
        "shift. Costs a teacher pass over the dev rows; the curve is logged to MLflow.")
    select_on_target: bool = Field(
        False, description="Choose k, tau and lam for the target without labels: from the "
        "unlabelled target-train rows, the labelled source rows and the models, by "
        "target_rule (docs/simda.md, 'The kNN half under domain shift'). No extra teacher "
        "pass; the curve is logged to MLflow.")
    target_rule: Literal["agreement", "iwcv", "far_source", "reverse", "entropy"] = Field(
        "iwcv", description="select_on_target's rule (on the four Amazon pairs no rule's p_T "
        "separates from the calibrated zero-shot's; docs/simda.md): agreement = kNN's target "
        "accuracy "
        "estimated from its agreement with the LLM on target vs source rows, (k, tau) by it "
        "and lam the naive-Bayes weight; iwcv = source leave-one-out accuracy weighted to the "
        "target by a domain classifier; far_source = source rows whose neighbours are as far "
        "as the target's; reverse = reverse validation of the pseudo-labels with a "
        "logistic-regression probe on the keys; entropy = least mean entropy of p_T.")
    k_grid: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    tau_grid: list[float] = Field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0])
    lam_grid: list[float] = Field(default_factory=lambda: [i / 10 for i in range(11)])


class DistillSection(TrainSection):
    """Student training: L = L_KL + beta * L_sim, plus ablations and baselines."""

    student: str = Field("pkg:all-minilm-l6-v2", description="Student encoder reference.")
    beta: float = Field(StudentTrain.beta, ge=0,
                        description="Weight of the similarity-alignment loss.")
    temperature: float = Field(StudentTrain.temperature, gt=0,
                               description="KL distillation temperature T.")
    sim_tau: float = Field(
        StudentTrain.sim_tau, gt=0, description="Temperature of the row-wise similarity "
        "softmax (unknown in the paper). Measured on books->kitchen: 0.1 lets L_sim swamp L_KL "
        "(student 0.51-0.62), 1.0 does not (0.70, same as KL alone after one epoch).")
    sim_loss: Literal["kl", "mse"] = StudentTrain.sim_loss  # type: ignore[assignment]
    sim_center: bool = Field(
        StudentTrain.sim_center, description="Centre teacher/student representations on the "
        "batch mean before the cosines (LLM states are anisotropic; without it the student "
        "collapses).")
    variants: list[Literal["kl_sim", "kl", "ce", "source_only", "oracle",
                           "source_only_all"]] = Field(
        default_factory=lambda: ["source_only", "kl_sim", "kl", "ce", "oracle"],
        description="Students to train: distilled (kl_sim, kl, ce) and baselines "
        "(source_only on the job's source rows, oracle on gold target-train labels: both "
        "step-matched; source_only_all: every row of the source file, `epochs` passes over "
        "them, a reference that is not step-matched).",
    )
    seed: int | None = Field(
        None, description="Seed of the student fits (None = run.seed). Changing it repeats "
        "the students on the same split and cached teacher outputs (run.seed also draws the "
        "data subsample).")
    eval_every_epoch: bool = Field(
        StudentTrain.eval_every_epoch, description="Evaluate every student on the target test "
        "split after every epoch (MLflow curve); false: after the last one only (each "
        "evaluation is a forward pass over the test rows: ~10 s per epoch at 300 rows on 2 CPU "
        "cores).")
    steps: int | None = Field(
        StudentTrain.steps, ge=1, description="Optimiser steps of every student but "
        "source_only_all (the same for distilled students and baselines); when set it wins "
        "over `epochs` for them (the run says so, and logs the epochs that ran). None = "
        "`epochs` passes over the target-train rows.")
    text_truncation: Literal["head", "tail", "head_tail"] = Field(
        StudentTrain.text_truncation, description="Which tokens of a text longer than "
        "max_length every student "
        "(distilled and baseline, in training and evaluation) keeps: head (the tokenizer's own "
        "truncation), tail, or head_tail (first and last halves, as the teacher's "
        "teacher.text_truncation).")


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
        a, C = self.annotate, len(self.data.labels)
        chosen_on = [n for n in ("select_on_source", "select_on_dev", "select_on_target")
                     if getattr(a, n)]
        if len(chosen_on) > 1:
            raise ValueError(f"annotate.{' and annotate.'.join(chosen_on)} are "
                             f"{'both' if len(chosen_on) == 2 else 'all'} true: choose one")
        if a.select_on_dev and self.data.dev is None:
            raise ValueError("annotate.select_on_dev needs data.dev: a labelled file of a third "
                             "domain (e.g. data.dev.path=dvd.jsonl)")
        if a.calibrate_llm == "median" and C != 2:
            raise ValueError(f"annotate.calibrate_llm=median needs 2 labels, got {C}: use prior")
        if isinstance(a.calibrate_prior, str) and a.calibrate_llm != "prior":
            raise ValueError(f"annotate.calibrate_prior={a.calibrate_prior} (an estimated "
                             f"prior) needs annotate.calibrate_llm=prior, got "
                             f"{a.calibrate_llm}")
        if a.calibrate_prior is not None and a.calibrate_llm in ("median", "none",
                                                                  "domain_mean"):
            raise ValueError(f"annotate.calibrate_prior={a.calibrate_prior} is not used by "
                             f"annotate.calibrate_llm={a.calibrate_llm}: use calibrate_llm=prior")
        if self.data.stream_target_train:
            d = self.data
            refused = [what for what, on in (
                ("annotate.select_on_target", a.select_on_target),
                (f"annotate.calibrate_prior={a.calibrate_prior}",
                 isinstance(a.calibrate_prior, str)),
                ("annotate.teacher_prompt=knn_prompt", a.teacher_prompt == "knn_prompt"))
                if on]
            if refused:
                raise ValueError(f"data.stream_target_train streams the target-train rows and "
                                 f"never holds them all, which {' and '.join(refused)} "
                                 f"need{'s' if len(refused) == 1 else ''}: change "
                                 f"{'it' if len(refused) == 1 else 'them'} or set "
                                 f"data.stream_target_train=false")
            if d.max_target_test_rows is None:
                raise ValueError("data.stream_target_train needs data.max_target_test_rows: the "
                                 "test split is held in the driver (e.g. 2000)")
        if isinstance(a.calibrate_prior, list) and (len(a.calibrate_prior) != C or min(
                a.calibrate_prior) < 0 or sum(a.calibrate_prior) <= 0):
            raise ValueError(f"annotate.calibrate_prior must be {C} non-negative weights "
                             f"(label order {self.data.labels}), got {a.calibrate_prior}")
        return self

    def chosen_at_run_time(self) -> list[str]:
        """``teacher.template`` when ``teacher.templates`` are scored; ``annotate.k`` / ``tau`` /
        ``lam`` when chosen on source, dev or target rows; ``annotate.calibrate_prior`` when
        estimated."""
        keys = ["teacher.template"] if self.teacher.templates else []
        a = self.annotate
        if a.select_on_source or a.select_on_dev or a.select_on_target:
            keys += ["annotate.k", "annotate.tau", "annotate.lam"]
        if isinstance(a.calibrate_prior, str):
            keys.append("annotate.calibrate_prior")
        return keys

    def inputs(self) -> tuple[list[ModelInput], list[DataInput]]:
        from raydapt.data.readers import DataError, resolve_files

        root, t, d = data_root(self.data.root), self.teacher, self.data
        target = [DataInput("data.target.path", root / d.target.path, d.target.format)]
        if d.stream_target_train:  # a directory or glob: every file it names
            try:
                files = resolve_files(root / d.target.path, d.target.format)
            except DataError:
                files = []  # preflight names it: not found
            target = [DataInput("data.target.path", Path(f), d.target.format)
                      for f in files] or target
        return ([ModelInput("teacher.model", t.model, t.revision, t.hf_token),
                 ModelInput("distill.student", self.distill.student)],
                [DataInput("data.source.path", root / d.source.path, d.source.format),
                 *target,
                 *([DataInput("data.dev.path", root / d.dev.path, d.dev.format)]
                   if d.dev is not None and self.annotate.select_on_dev else [])])
